"""A container's module carried as a layer of its image (a wasm OCI image), read from containerd.

Images built for runwasi's shims (and the CNCF wasm OCI artifact) carry the module as a layer of a
wasm media type rather than as a file in a tar layer: containerd unpacks no such layer, so the
container's rootfs is empty. As runwasi does, the image counts as such when its config says
`architecture: wasm`; its first wasm layer is the module, and args[0] only chooses the export to run
(`#name`, else `_start`). The image is found the way runwasi finds it: containerd's container record
names it (the Containers service), the Images service gives its manifest (or index), the Content
service its blobs.

`manifest_of`, `wasm_layers` and `is_wasm_image` read the JSON documents, sans I/O; `ImageModules`
makes the calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kuasar.common.errors import Code, FailedPrecondition, InvalidArgument

# The layer media types runwasi's shims run (its `supported_layers_types`), plus the CNCF wasm OCI
# artifact's.
WASM_LAYER_TYPES = frozenset({
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/wasm",
})
INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})
# What a platform of a wasm image says in an index: runwasi's images say wasi/wasm, the CNCF artifact's
# config says wasip1 or wasip2.
WASM_ARCHITECTURE = "wasm"
# A manifest, an index or a config is a small JSON document; containerd's own reader refuses more than
# this for a manifest.
MAX_DOCUMENT_BYTES = 4 << 20
# A module layer larger than this is refused rather than read into memory (the largest modules in use,
# whole language runtimes compiled to wasm, are tens of MB).
MAX_MODULE_BYTES = 256 << 20
# What a blob's chunks add to its bytes on the wire (each chunk's prefix and offset; 1 MiB chunks).
CHUNKS_OVERHEAD = 1 << 20
# containerd's gRPC header that carries the namespace of a call.
NAMESPACE_HEADER = "containerd-namespace"
# The module is written into the container's bundle, which containerd removes with the task.
BUNDLE_MODULE = "image-layer.wasm"

Call = Callable[..., Awaitable[list[Any]]]


def _document(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the image's {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the image's {what} is not a JSON object")
    return doc


def _descriptors(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = doc.get(key) or []
    return [d for d in items if isinstance(d, dict)] if isinstance(items, list) else []


def manifest_of(index: dict[str, Any]) -> dict[str, Any] | None:
    """The descriptor of an index's manifest a wasm container runs: the one for the wasm platform, else
    the only one; None when there is neither (a Linux image for several platforms)."""
    manifests = _descriptors(index, "manifests")
    for descriptor in manifests:
        platform = descriptor.get("platform") or {}
        if isinstance(platform, dict) and platform.get("architecture") == WASM_ARCHITECTURE:
            return descriptor
    return manifests[0] if len(manifests) == 1 else None


def is_wasm_image(config: dict[str, Any]) -> bool:
    return config.get("architecture") == WASM_ARCHITECTURE


def wasm_layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer for layer in _descriptors(manifest, "layers") if layer.get("mediaType") in WASM_LAYER_TYPES]


def _digest_hex(digest: object) -> str:
    algorithm, _, value = str(digest).partition(":")
    if algorithm != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
        raise InvalidArgument(f"the image names a blob by {digest!r}, not by a sha256 digest")
    return value


class ContainerdUnavailable(FailedPrecondition):
    """containerd could not be asked (its socket, a timeout, an error status): whether the image carries
    a module is not known."""


@dataclass(frozen=True)
class ImageModule:
    image: str
    digest: str  # of the layer, "sha256:<hex>"
    path: Path  # where its bytes were written


class ImageModules:
    """Asks containerd at `address` (its gRPC socket) for a container's wasm image layer."""

    def __init__(self, address: str, call: Call | None = None) -> None:
        self.address = address
        self._call_override = call

    async def _call(self, path: str, request: Any, reply_type: type, namespace: str, max_reply_bytes: int,
                    what: str, missing_ok: bool = False, on_message: Callable[[Any], None] | None = None,
                    ) -> list[Any]:
        # Imported here: h2 is resident only in a task server that looked an image up.
        from kuasar.common import grpc_h2_client

        call = self._call_override or grpc_h2_client.call
        try:
            return await call(self.address, path, request, reply_type, metadata=((NAMESPACE_HEADER, namespace),),
                              max_reply_bytes=max_reply_bytes, on_message=on_message)
        except grpc_h2_client.GrpcCallError as exc:
            if missing_ok and exc.code == Code.NOT_FOUND:
                return []
            raise ContainerdUnavailable(f"reading {what} from containerd ({self.address}, {path}): {exc}") from None

    async def _unary(self, namespace: str, path: str, request: Any, reply_type: type,
                     missing_ok: bool = False) -> Any:
        """The one reply; None for a NOT_FOUND that is `missing_ok`."""
        replies = await self._call(path, request, reply_type, namespace, MAX_DOCUMENT_BYTES,
                                   "the container's image", missing_ok)
        if missing_ok and not replies:
            return None
        if len(replies) != 1:
            raise FailedPrecondition(f"containerd answered {path} with {len(replies)} messages")
        return replies[0]

    async def _read(self, namespace: str, descriptor: dict[str, Any], limit: int, what: str,
                    sink: BinaryIO) -> None:
        """Write the blob `descriptor` names to `sink` as its chunks arrive, then check it against the
        descriptor's digest and size: the store checked them when the blob was written; checked again,
        what runs is what the image names even if the store's file changed since."""
        import hashlib  # here: hashlib maps libcrypto, which a task server otherwise never needs

        from kuasar.common.api.containerd.services.content.v1 import content_pb2

        hex_digest = _digest_hex(descriptor.get("digest"))
        size = descriptor.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
            raise InvalidArgument(f"the image's {what} ({descriptor.get('digest')}) has size {size!r}; "
                                  f"at most {limit} bytes are read")
        digest = hashlib.sha256()
        written = 0

        def chunk_arrived(chunk: Any) -> None:
            nonlocal written
            if chunk.offset != written:  # containerd sends a blob in order
                raise InvalidArgument(f"containerd sent the image's {what} out of order "
                                      f"(offset {chunk.offset}, expected {written})")
            sink.write(chunk.data)
            digest.update(chunk.data)
            written += len(chunk.data)

        await self._call("/containerd.services.content.v1.Content/Read",
                         content_pb2.ReadContentRequest(digest=f"sha256:{hex_digest}"),
                         content_pb2.ReadContentResponse, namespace, limit + CHUNKS_OVERHEAD,
                         f"the image's {what} sha256:{hex_digest}", on_message=chunk_arrived)
        if written != size or digest.hexdigest() != hex_digest:
            raise InvalidArgument(f"the image's {what} read from containerd does not match its digest "
                                  f"sha256:{hex_digest} and size {size}")

    async def _document(self, namespace: str, descriptor: dict[str, Any], what: str) -> dict[str, Any]:
        sink = io.BytesIO()
        await self._read(namespace, descriptor, MAX_DOCUMENT_BYTES, what, sink)
        return _document(sink.getvalue(), what)

    async def _write_module(self, namespace: str, layer: dict[str, Any], path: Path) -> None:
        """The layer into `path`, through a temporary file made anew (never one planted there before)."""
        tmp = path.with_name(f".{path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                await self._read(namespace, layer, MAX_MODULE_BYTES, "wasm layer", f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def find(self, container_id: str, namespace: str, bundle: Path) -> ImageModule | None:
        """The module of the container's image, written to `<bundle>/image-layer.wasm`; None when its
        image is no wasm image (no `wasm` architecture, or no wasm layer)."""
        # Imported here, as h2 is: ~150 KB a task server that never reads an image does not hold.
        from kuasar.common.api.containerd.services.containers.v1 import containers_pb2
        from kuasar.common.api.containerd.services.images.v1 import images_pb2

        # A container containerd has no record of (made through the Task API alone) has no image either.
        reply = await self._unary(namespace, "/containerd.services.containers.v1.Containers/Get",
                                  containers_pb2.GetContainerRequest(id=container_id),
                                  containers_pb2.GetContainerResponse, missing_ok=True)
        image_name = reply.container.image if reply is not None else ""
        if not image_name:
            return None
        image = (await self._unary(namespace, "/containerd.services.images.v1.Images/Get",
                                   images_pb2.GetImageRequest(name=image_name), images_pb2.GetImageResponse)).image
        target = {"mediaType": image.target.media_type, "digest": image.target.digest, "size": image.target.size}
        if target["mediaType"] in INDEX_TYPES:
            index = await self._document(namespace, target, "index")
            chosen = manifest_of(index)
            if chosen is None:
                return None
            target = chosen
        manifest = await self._document(namespace, target, "manifest")
        config_descriptor = manifest.get("config")
        layers = wasm_layers(manifest)
        if not layers or not isinstance(config_descriptor, dict):
            return None
        config = await self._document(namespace, config_descriptor, "config")
        if not is_wasm_image(config):
            return None
        layer = layers[0]
        path = bundle / BUNDLE_MODULE
        await self._write_module(namespace, layer, path)
        return ImageModule(image_name, str(layer["digest"]), path)


def containerd_address(events_address: str) -> str:
    """containerd's gRPC socket, from the ttrpc one a sandboxer is given: containerd serves ttrpc at its
    gRPC address plus `.ttrpc`."""
    return events_address.removesuffix(".ttrpc") if events_address.endswith(".ttrpc") else ""

