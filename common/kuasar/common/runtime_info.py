"""`<shim binary> -info`: a runtime's name, version and OCI features, as containerd 2.x asks for them.

containerd runs `containerd-shim-kuasar-<type>-v1 -info` (the runtime options on stdin, a marshalled
`containerd.types.RuntimeInfo` expected on stdout) before it creates a task whose spec has id-mapped
mounts: CRI gives them to the volumes of a pod with its own user namespace. It refuses the task unless
the features say `linux.mountExtensions.idmap.enabled`, because runc silently ignores what it does not
know. runc-sandboxer runs its containers with runc, so its features are `runc features`, as containerd's
runc shim reports them. The other types run no runc-compatible runtime and report no features (they
refuse user-namespaced pods at RunPodSandbox, so no such task reaches them).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from . import __version__, tools
from .api.containerd.types import introspection_pb2 as introspection

log = logging.getLogger("kuasar.shim")

# How containerd's typeurl names the runtime-spec `features` document (a JSON value, not protobuf).
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
# `runc features` answers at once; the bound is only for a hung binary (containerd waits on us).
FEATURES_TIMEOUT = 10.0
# The sandbox types whose containers runc runs (and whose features are therefore runc's).
RUNC_TYPES = frozenset({"runc"})


class InfoError(Exception):
    pass


def runtime_info(kind: str, options: bytes, runc: str = "runc", shim: str = "v1") -> introspection.RuntimeInfo:
    """The RuntimeInfo for sandbox type `kind` behind runtime `io.containerd.kuasar-<kind>.<shim>`;
    `options` is the marshalled Any containerd sent."""
    info = introspection.RuntimeInfo(name=f"io.containerd.kuasar-{kind}.{shim}",
                                     version=introspection.RuntimeVersion(version=__version__,
                                                                          revision="kuasar-py"))
    if options:
        try:
            info.options.ParseFromString(options)
        except DecodeError as exc:
            raise InfoError(f"the runtime options on stdin are not a protobuf Any: {exc}") from None
    if kind in RUNC_TYPES:
        features = runc_features(runc)
        if features is not None:
            info.features.CopyFrom(any_pb2.Any(type_url=FEATURES_TYPE_URL, value=features))
    return info


def runc_features(runc: str) -> bytes | None:
    """`runc features` as JSON bytes; None (logged) when this runc cannot say, as containerd's runc shim
    then reports no features either."""
    try:
        done = subprocess.run([runc, "features"], capture_output=True, timeout=FEATURES_TIMEOUT, check=True)
        document = json.loads(done.stdout)
    except subprocess.CalledProcessError as exc:
        log.warning("%s features failed: %s", runc, exc.stderr.decode(errors="replace").strip() or exc)
        return None
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("%s features: %s", runc, exc)
        return None
    if not isinstance(document, dict):
        log.warning("%s features printed %r, not a JSON object", runc, type(document).__name__)
        return None
    return json.dumps(document, separators=(",", ":")).encode()


def configured_runc(executable: str) -> str:
    """The runc runc-sandboxer runs: `[runc] binary` of its installed config (`/etc/kuasar/runc.toml`, or
    `<prefix>/etc/kuasar/runc.toml` next to this binary's `bin/`, as `make install` lays them out), else
    `runc` on PATH (its default too)."""
    import tomllib  # only for -info

    candidates = [Path("/etc/kuasar/runc.toml")]
    prefix = tools.install_prefix(executable)
    if prefix is not None:
        candidates.append(prefix / "etc" / "kuasar" / "runc.toml")
    for path in candidates:
        try:
            binary = tomllib.loads(path.read_text()).get("runc", {}).get("binary")
        except (OSError, ValueError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("%s: %s; taking runc from PATH", path, exc)
            continue
        return binary if isinstance(binary, str) and binary else "runc"
    return "runc"


def print_info(prog: str, kind: str, shim: str = "v1") -> int:
    """The whole `-info` action: options from stdin, the RuntimeInfo on stdout; 1 with a message on stderr."""
    executable = sys.executable if getattr(sys, "frozen", False) else sys.argv[0]
    try:
        info = runtime_info(kind, sys.stdin.buffer.read(), runc=configured_runc(executable), shim=shim)
    except InfoError as exc:
        print(f"{prog}: -info: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(info.SerializeToString())
    sys.stdout.buffer.flush()
    return 0
