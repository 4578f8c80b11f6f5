"""Build docker-archive image tarballs for `ctr images import`, offline and with the stdlib only.

The images hold the host's statically linked ``/bin/busybox`` (Debian package ``busybox-static``)
with one symlink per applet, a minimal ``/etc/passwd`` and ``/etc/group`` and the usual top-level
directories. Everything is reproducible: mtime 0, uid/gid 0, sorted entries, a fixed ``created``
date, so building twice gives byte-identical tarballs (and the same image digest).

Library use::

    from tests.support.images import build_busybox_image, build_pause_image
    tar = build_busybox_image(tmp_path / "busybox.tar")        # ref localhost/kuasar/busybox:latest
    pause = build_pause_image(tmp_path / "pause.tar")          # ref localhost/kuasar/pause:latest

Command line (writes busybox.tar and pause.tar into OUTDIR and prints their paths)::

    python -m tests.support.images OUTDIR
    python tests/support/images.py OUTDIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

BUSYBOX_REF = "localhost/kuasar/busybox:latest"
PAUSE_REF = "localhost/kuasar/pause:latest"
DEFAULT_BUSYBOX = "/bin/busybox"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
CREATED = "1970-01-01T00:00:00Z"

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
DIRS = {
    "bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o755, "root": 0o700, "run": 0o755,
    "sbin": 0o755, "sys": 0o755, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "var": 0o755, "var/run": 0o755, "var/tmp": 0o1777,
}

# A file in the layer: bytes (mode 0644), (bytes, mode), or ("symlink", target).
FileSpec = bytes | tuple[bytes, int] | tuple[str, str]


def busybox_applets(busybox: str | os.PathLike[str] = DEFAULT_BUSYBOX) -> list[str]:
    """Applet names of a busybox binary (``busybox --list``), minus ``busybox`` and odd names."""
    out = subprocess.run([os.fspath(busybox), "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a.strip() for a in out.split() if a.strip() and "/" not in a and a != "busybox"})


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_layer(dirs: Mapping[str, int], files: Mapping[str, FileSpec]) -> bytes:
    """An uncompressed, reproducible layer tar (PAX) of ``dirs`` {path: mode} and ``files``."""
    buf = io.BytesIO()
    all_dirs = dict(dirs)
    for path in files:  # make sure every parent directory exists
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            all_dirs.setdefault("/".join(parts[:i]), 0o755)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(all_dirs):
            tar.addfile(_tarinfo(path.strip("/"), tarfile.DIRTYPE, all_dirs[path]))
        for path in sorted(files):
            spec = files[path]
            name = path.strip("/")
            if isinstance(spec, tuple) and spec[0] == "symlink":
                tar.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=str(spec[1])))
                continue
            data, mode = (spec, 0o644) if isinstance(spec, bytes) else spec
            assert isinstance(data, bytes)
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, int(mode), size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def _write_if_changed(dest: Path, data: bytes) -> None:
    if dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _resolve_dest(dest: str | os.PathLike[str], ref: str) -> Path:
    path = Path(dest)
    if path.is_dir():
        name = ref.rsplit("/", 1)[-1].split(":", 1)[0] or "image"
        path = path / f"{name}.tar"
    return path


def image_config_bytes(ref: str, config: Mapping[str, object], diff_ids: Sequence[str],
                       architecture: str = "amd64", os_name: str = "linux") -> bytes:
    """An image's config document (what CRI knows the image by: its digest is the image id)."""
    image_config = {
        "architecture": architecture,
        "os": os_name,
        "created": CREATED,
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": CREATED, "created_by": f"kuasar-py tests/support/images.py ({ref})"}],
    }
    return json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()


def build_image(
    dest: str | os.PathLike[str],
    ref: str,
    layers: Sequence[bytes],
    *,
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = tuple(DEFAULT_ENV),
    working_dir: str = "/",
    labels: Mapping[str, str] | None = None,
    architecture: str = "amd64",
    os_name: str = "linux",
) -> Path:
    """Write a docker-archive tarball (config, ``<diff_id>/layer.tar``, ``manifest.json``).

    ``dest`` is the tarball path, or a directory (the file is then named after the image). The file
    is rewritten only if its content would change. Returns the tarball path.
    """
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config: dict[str, object] = {"Env": list(env), "WorkingDir": working_dir}
    if cmd is not None:
        config["Cmd"] = list(cmd)
    if entrypoint is not None:
        config["Entrypoint"] = list(entrypoint)
    if labels:
        config["Labels"] = dict(labels)
    config_bytes = image_config_bytes(ref, config, diff_ids, architecture, os_name)
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_names = [d.split(":", 1)[1] + "/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": layer_names}]
    members: dict[str, bytes] = {config_name: config_bytes, "manifest.json": json.dumps(manifest).encode()}
    members.update(zip(layer_names, layers, strict=True))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({n.split("/", 1)[0] for n in members if "/" in n}):
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
        for name in sorted(members):
            data = members[name]
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    path = _resolve_dest(dest, ref)
    _write_if_changed(path, buf.getvalue())
    return path


# Media types of an OCI image layout's documents.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def build_oci_archive(
    dest: str | os.PathLike[str],
    ref: str,
    layers: Sequence[tuple[str, bytes]],
    *,
    architecture: str = "wasm",
    os_name: str = "wasip1",
    entrypoint: Sequence[str] | None = None,
) -> Path:
    """Write an OCI image layout tarball of one manifest whose ``layers`` are (media type, bytes), as
    `ctr images import` takes it: for images whose layers are no tar (a wasm layer), which a
    docker-archive cannot carry. The config lists no diff_ids: containerd unpacks none of them."""
    blobs: dict[str, bytes] = {}

    def blob(media_type: str, data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[f"blobs/sha256/{digest}"] = data
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def document(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    config: dict[str, object] = {"Entrypoint": list(entrypoint)} if entrypoint is not None else {}
    layer_descriptors = [blob(media_type, data) for media_type, data in layers]
    # The layers' digests in the config, as the CNCF wasm artifact's config lists them: CRI knows an
    # image by its config's digest, and two images with one config would be one image to it.
    image_config = {"architecture": architecture, "os": os_name, "created": CREATED, "config": config,
                    "rootfs": {"type": "layers", "diff_ids": []},
                    "layerDigests": [d["digest"] for d in layer_descriptors]}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": blob(OCI_CONFIG, document(image_config)), "layers": layer_descriptors}
    descriptor = blob(OCI_MANIFEST, document(manifest))
    descriptor["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref}
    descriptor["platform"] = {"architecture": architecture, "os": os_name}
    members = {**blobs, "index.json": document({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                 "manifests": [descriptor]}),
               "oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs", "blobs/sha256"):
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
        for name in sorted(members):
            data = members[name]
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    path = _resolve_dest(dest, ref)
    _write_if_changed(path, buf.getvalue())
    return path


def busybox_layer(
    busybox: str | os.PathLike[str] = DEFAULT_BUSYBOX,
    extra_files: Mapping[str, FileSpec] | None = None,
) -> bytes:
    """The layer of the busybox image: busybox + applet symlinks + /etc/{passwd,group} + dirs."""
    files: dict[str, FileSpec] = {
        "bin/busybox": (Path(busybox).read_bytes(), 0o755),
        "etc/passwd": PASSWD,
        "etc/group": GROUP,
        "usr/bin/env": ("symlink", "/bin/busybox"),
    }
    for applet in busybox_applets(busybox):
        files.setdefault(f"bin/{applet}", ("symlink", "busybox"))
    files.update(extra_files or {})
    return build_layer(DIRS, files)


def extract_busybox_rootfs(rootfs: Path) -> None:
    """Unpack the busybox layer into the existing directory `rootfs` (a bundle's rootfs for runc)."""
    with tarfile.open(fileobj=io.BytesIO(busybox_layer())) as layer:
        # Our own layer, so any filter does; Python before 3.11.4 (Debian 12's 3.11.2) has none.
        if hasattr(tarfile, "tar_filter"):
            layer.extractall(rootfs, filter="tar")
        else:
            layer.extractall(rootfs)  # noqa: S202 - built above from known files


def build_busybox_image(
    dest: str | os.PathLike[str],
    ref: str = BUSYBOX_REF,
    cmd: Sequence[str] = ("sh",),
    *,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = tuple(DEFAULT_ENV),
    extra_files: Mapping[str, FileSpec] | None = None,
    busybox: str | os.PathLike[str] = DEFAULT_BUSYBOX,
) -> Path:
    """A busybox image (host's static busybox); ``Cmd`` defaults to ``["sh"]``."""
    layer = busybox_layer(busybox, extra_files)
    return build_image(dest, ref, [layer], cmd=cmd, entrypoint=entrypoint, env=env)


def build_pause_image(
    dest: str | os.PathLike[str],
    ref: str = PAUSE_REF,
    *,
    busybox: str | os.PathLike[str] = DEFAULT_BUSYBOX,
) -> Path:
    """A pause-like image for containerd's built-in ``podsandbox`` path: busybox ``sleep 2147483647``."""
    return build_busybox_image(dest, ref, ["sleep", "2147483647"], busybox=busybox)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("outdir", type=Path, help="directory to write busybox.tar and pause.tar into")
    parser.add_argument("--busybox", default=DEFAULT_BUSYBOX, help="static busybox binary to embed")
    parser.add_argument("--busybox-ref", default=BUSYBOX_REF)
    parser.add_argument("--pause-ref", default=PAUSE_REF)
    parser.add_argument("--cmd", nargs="+", default=["sh"], help="Cmd of the busybox image")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    print(build_busybox_image(args.outdir / "busybox.tar", args.busybox_ref, args.cmd, busybox=args.busybox))
    print(build_pause_image(args.outdir / "pause.tar", args.pause_ref, busybox=args.busybox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
