"""The commands of an OCI runtime (runc, runsc) that a dead task server left running on its root.

A task server started after another one died sweeps what the runtime keeps in its root. A command still
running then (a `runc create` waiting on a hook; a `runsc create` half way through making a gVisor
sandbox, ~0.1-0.2 s of every pod start) is not there yet: both runtimes save a container's state only
at the end of its create. Left alone it would finish after the sweep, and leave a container (a whole
sandbox, for runsc) that nobody knows of. So every command of our runtime binary on our root is ended
first, with all it started (a hook and what that forked; runsc's sandbox and gofer processes). A create
ended before its state was saved leaves what the sweep cannot find, removed here: the rootfs mount, the
container's cgroup (and what is left in it) and the runtime's own files of it.

Only our runtime binary, in our mount namespace, as our user, is believed (strays.commands_of).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path

from . import cgroups, mounts, strays
from .errors import KuasarError, NotFound
from .ids import validate_id
from .runc_cli import ROOT_FLAG
from .spawn import resolve

log = logging.getLogger(__name__)

class LeftRuntimeCommands:
    """For a task server's backend: `_end_runtime_commands`, and what it needs to know of the runtime."""

    # -- what a backend says about its runtime -------------------------------------------------------
    def _runtime_binary_and_root(self) -> tuple[str, Path]:
        raise NotImplementedError

    def _runtime_saved(self, container_id: str) -> bool:
        """Whether the runtime keeps a state of the container (the sweep then deletes it)."""
        raise NotImplementedError

    def _forget_unsaved(self, container_id: str) -> None:
        """Remove what the runtime keeps in its root of a create ended before it saved the container."""
        raise NotImplementedError

    def _is_bundle_of(self, container_id: str, bundle: Path) -> bool:
        """Whether `bundle` (from a create's command line) is the container's own, whose rootfs and
        cgroup are ours to remove."""
        # containerd names a task's bundle after it (<state>/io.containerd.runtime.v2.task/<ns>/<id>).
        return bundle.name == container_id

    # -- the ending ----------------------------------------------------------------------------------
    async def _end_runtime_commands(self) -> None:
        """End every command of our runtime on our root, and all it started; remove what the creates
        among them made before the runtime saved their container (see the module)."""
        binary, root = self._runtime_binary_and_root()
        flag, our_root = os.fsencode(ROOT_FLAG), os.fsencode(root)
        try:
            program = resolve(binary)
        except NotFound:  # then no command of it can be running either
            return
        commands = strays.commands_of(program, lambda argv: any(
            (name, value) == (flag, our_root) for name, value in itertools.pairwise(argv)))
        if not commands:
            return
        ended = [(pid, start) for pid, start, _ in commands]
        ended += strays.descendants_of({pid for pid, _ in ended})
        for pid, start in ended:
            log.warning("process %d of a %s command a task server that is gone left running: ending it",
                        pid, os.path.basename(binary))
            strays.kill(pid, start)
        await strays.wait_gone(ended)
        unsaved: list[tuple[str, Path]] = []
        for pid, start, argv in commands:
            create = create_of(argv)
            if not strays.gone(pid, start):
                log.error("%s command %d is still there after SIGKILL; what it makes stays",
                          os.path.basename(binary), pid)
            elif create is not None and not self._runtime_saved(create[0]):
                unsaved.append(create)  # with a state, the sweep deletes it
        paths = [path for container_id, bundle in unsaved if (path := self._remove_unsaved(container_id, bundle))]
        for directory in cgroups.empty_and_remove(paths):
            log.error("cgroup %s of a create that was ended is still busy; left in place", directory)

    def _remove_unsaved(self, container_id: str, bundle: Path) -> str | None:
        """Unmount the rootfs of a create the runtime had not saved and remove the runtime's files of it;
        the container's cgroup path, if it is one of a container (named after it), for the caller to
        remove."""
        log.warning("container %s: its create ended before the runtime saved it; removing what it made",
                    container_id)
        self._forget_unsaved(container_id)
        if bundle.is_symlink() or not bundle.is_dir() or not self._is_bundle_of(container_id, bundle):
            log.error("container %s: bundle %s is not the container's; left alone", container_id, bundle)
            return None
        try:
            mounts.unmount_all(bundle / "rootfs")
        except OSError as exc:
            log.error("container %s: unmounting its rootfs: %s", container_id, exc)
        try:
            path = json.loads((bundle / "config.json").read_bytes())["linux"]["cgroupsPath"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # Made a cgroupfs path by our Create; a parent's (shared with other containers) is not taken.
        if isinstance(path, str) and path.startswith("/") and container_id in path.rsplit("/", 1)[-1]:
            return path
        return None


def create_of(argv: list[bytes]) -> tuple[str, Path] | None:
    """(container id, bundle) of a `<runtime> ... create --bundle <bundle> ... <id>` command line (the
    shape `Runc.create` and `Runsc.create` give it), else None."""
    args = [arg for arg in argv if arg]
    if b"create" not in args or b"--bundle" not in args[:-1]:
        return None
    bundle = Path(os.fsdecode(args[args.index(b"--bundle") + 1]))
    try:
        container_id = validate_id(os.fsdecode(args[-1]), "container id")
    except KuasarError:
        return None
    return (container_id, bundle) if bundle.is_absolute() else None
