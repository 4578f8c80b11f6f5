"""Sandboxes a forwarding shim v2 made for containerd 1.6/1.7 and could not remove.

The shim (shim_v2.py) makes a sandbox at its owner container's `start` (CRI's pause container, `ctr
run`'s container) and removes it at that container's `delete`. If the sandboxer is down or slow then,
the `delete` still has to answer within containerd's 5 s, and containerd deletes the owner's bundle
right after it: nothing would ever ask again. So the shim labels the sandbox with that bundle, and a
sandbox whose bundle is gone is an orphan the sandboxer removes itself (at its start, and whenever the
shim makes another sandbox).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .sandboxer import SandboxRecord

SHIM_LABEL = "io.kuasar.shim"
BUNDLE_LABEL = "io.kuasar.shim.bundle"


def made_by_the_shim(record: SandboxRecord) -> bool:
    return record.labels.get(SHIM_LABEL) == "v2" and bool(record.labels.get(BUNDLE_LABEL))


def orphans(records: Iterable[SandboxRecord]) -> list[str]:
    """The ids of the shim's sandboxes whose owner's bundle containerd has removed. Only a bundle whose
    folder (containerd's `<state>/io.containerd.runtime.v2.task/<namespace>`) we can see counts as
    removed: a path this process cannot see at all (another mount namespace) proves nothing."""
    found = []
    for record in records:
        if not made_by_the_shim(record):
            continue
        bundle = Path(record.labels[BUNDLE_LABEL])
        if bundle.is_absolute() and bundle.parent.is_dir() and not bundle.exists():
            found.append(record.id)
    return found
