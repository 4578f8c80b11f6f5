"""A read-only OCI distribution registry on the loopback, for tests of what only a registry gives.

containerd knows an image pulled from a registry by its repository digest (`<name>@sha256:...`), one it
imported by its image id only, and some of its paths pull again by that digest (CRI's restore of a
checkpoint pulls the checkpoint's base image). This serves one image's manifest by tag and by digest
and its blobs, over plain HTTP (containerd uses HTTP for a loopback registry), from a thread, and
records what was asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .images import image_config_bytes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Uncompressed layers: containerd takes them, and the layer's digest is then its diff id.
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# /v2/<name>/(manifests|blobs)/<reference>, <name> being path components (distribution spec).
# The first byte of a TLS client hello (a handshake record).
TLS_HANDSHAKE_RECORD = b"\x16"
ROUTE = re.compile(r"^/v2/(?P<name>[a-z0-9._/-]+)/(?P<kind>manifests|blobs)/(?P<reference>[A-Za-z0-9_.:+-]+)$")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class RegistryImage:
    """One image as a registry holds it: repository `name`, `tag`, its manifest and blobs."""

    name: str
    tag: str
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def manifest_digest(self) -> str:
        return digest_of(self.manifest)


def registry_image(name: str, tag: str, layers: Sequence[bytes], config: Mapping[str, object]) -> RegistryImage:
    """An image of uncompressed tar `layers` and OCI image `config` (Env, Cmd, Labels...)."""
    diff_ids = [digest_of(layer) for layer in layers]
    config_bytes = image_config_bytes(f"{name}:{tag}", config, diff_ids)
    blobs = {digest_of(config_bytes): config_bytes, **{digest_of(layer): layer for layer in layers}}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config_bytes), "size": len(config_bytes)},
                "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}
                           for layer in layers]}
    return RegistryImage(name, tag, json.dumps(manifest, sort_keys=True).encode(), blobs)


@dataclass
class Registry:
    """What a running registry serves (`authority`: host:port) and the requests it answered."""

    authority: str
    image: RegistryImage
    requests: list[str] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return f"{self.authority}/{self.image.name}:{self.image.tag}"

    @property
    def digest_reference(self) -> str:
        return f"{self.authority}/{self.image.name}@{self.image.manifest_digest}"


def _handler(registry: Registry) -> type[http.server.BaseHTTPRequestHandler]:
    image = registry.image

    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_one_request(self) -> None:
            # CRI's pull tries HTTPS first and falls back to HTTP for a loopback registry only when the
            # answer to its TLS hello starts "HTTP/" (Go's "server gave HTTP response to HTTPS client");
            # http.server would answer that binary request line in HTTP/0.9 style, without a status line.
            if self.rfile.peek(1)[:1] == TLS_HANDSHAKE_RECORD:
                self.wfile.write(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.close_connection = True
                return
            super().handle_one_request()

        def _answer(self, send_body: bool) -> None:
            registry.requests.append(f"{self.command} {self.path}")
            route = ROUTE.match(self.path)
            body, media_type, digest = b"", "application/json", ""
            if self.path == "/v2/":
                body = b"{}"
            elif route and route["name"] == image.name and route["kind"] == "manifests" and \
                    route["reference"] in (image.tag, image.manifest_digest):
                body, media_type, digest = image.manifest, OCI_MANIFEST, image.manifest_digest
            elif route and route["name"] == image.name and route["kind"] == "blobs" and \
                    route["reference"] in image.blobs:
                body, media_type, digest = image.blobs[route["reference"]], "application/octet-stream", \
                    route["reference"]
            else:
                self._not_found(send_body)
                return
            self.send_response(200)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            if digest:
                self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _not_found(self, send_body: bool) -> None:
            route = ROUTE.match(self.path)
            code = {"manifests": "MANIFEST_UNKNOWN", "blobs": "BLOB_UNKNOWN"}.get(route["kind"] if route else "",
                                                                                "NAME_UNKNOWN")
            body = json.dumps({"errors": [{"code": code, "message": f"{self.path} is not here"}]}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._answer(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(send_body=False)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serve_registry(image: RegistryImage) -> Iterator[Registry]:
    """Serve `image` on the loopback from a thread for the duration of the block."""
    registry = Registry("", image)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    registry.authority = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
