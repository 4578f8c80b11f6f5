"""The tests' loopback OCI registry (tests/support/oci_registry.py) answers as a registry does."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.support.oci_registry import OCI_MANIFEST, digest_of, registry_image, serve_registry


def test_it_serves_the_manifest_by_tag_and_digest_and_the_blobs_it_names() -> None:
    image = registry_image("kuasar/thing", "v1", [b"layer bytes"], {"Cmd": ["sh"]})
    with serve_registry(image) as registry:
        base = f"http://{registry.authority}/v2/kuasar/thing"
        for reference in ("v1", image.manifest_digest):
            with urllib.request.urlopen(f"{base}/manifests/{reference}") as answer:
                assert answer.headers["Content-Type"] == OCI_MANIFEST
                assert answer.headers["Docker-Content-Digest"] == image.manifest_digest
                manifest = json.loads(answer.read())
        config = manifest["config"]["digest"]
        with urllib.request.urlopen(f"{base}/blobs/{config}") as answer:
            assert digest_of(answer.read()) == config
        assert json.loads(image.blobs[config])["rootfs"]["diff_ids"] == [digest_of(b"layer bytes")]
        with urllib.request.urlopen(f"{base}/blobs/{manifest['layers'][0]['digest']}") as answer:
            assert answer.read() == b"layer bytes"
        for missing in ("manifests/v2", f"blobs/{digest_of(b'other')}"):
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(f"{base}/{missing}")
            assert answer.value.code == 404
        assert registry.digest_reference == f"{registry.authority}/kuasar/thing@{image.manifest_digest}"
        assert f"GET /v2/kuasar/thing/manifests/{image.manifest_digest}" in registry.requests


def test_a_tls_hello_gets_an_http_status_line() -> None:
    # What makes containerd's pull fall back from HTTPS to HTTP for a loopback registry.
    with serve_registry(registry_image("kuasar/thing", "v1", [b"x"], {})) as registry:
        host, port = registry.authority.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(b"\x16\x03\x01\x00\x05hello")
            assert conn.recv(64).startswith(b"HTTP/1.0 400")
