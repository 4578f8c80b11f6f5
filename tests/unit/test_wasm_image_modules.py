"""image_modules: a container's module read from its image's wasm layer, against a fake of containerd's
Containers, Images and Content services (the real ones: test_wasm_cri.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from kuasar.common.api.containerd.services.containers.v1 import containers_pb2
from kuasar.common.api.containerd.services.content.v1 import content_pb2
from kuasar.common.api.containerd.services.images.v1 import images_pb2
from kuasar.common.api.containerd.types import descriptor_pb2
from kuasar.common.errors import Code, FailedPrecondition, InvalidArgument
from kuasar.common.grpc_h2_client import GrpcCallError
from kuasar.wasm import image_modules
from kuasar.wasm.image_modules import ImageModules, containerd_address, is_wasm_image, manifest_of, wasm_layers
from kuasar.wasm.sandboxer import task_server_options

LAYER = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
MODULE = b"\0asm\x01\0\0\0"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


class FakeContainerd:
    """containers {id: image name}, images {name: target descriptor}, blobs {digest: bytes}."""

    def __init__(self) -> None:
        self.containers: dict[str, str] = {}
        self.images: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.chunk = 3
        self.shuffled = False

    def blob(self, media_type: str, data: bytes | dict) -> dict:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.blobs[digest] = raw
        return {"mediaType": media_type, "digest": digest, "size": len(raw)}

    def image(self, name: str, *, architecture: str = "wasm", layers: list[tuple[str, bytes]] | None = None) -> dict:
        config = self.blob("application/vnd.oci.image.config.v1+json",
                           {"architecture": architecture, "os": "wasip1", "rootfs": {"diff_ids": []}})
        manifest = {"config": config, "layers": [self.blob(t, d) for t, d in (layers or [(LAYER, MODULE)])]}
        target = self.blob(MANIFEST, manifest)
        self.images[name] = target
        return target

    async def __call__(self, address: str, path: str, request, reply_type, *, metadata=(), max_reply_bytes=0,
                       on_message=None):
        self.calls.append((path, metadata))
        if path.endswith("Containers/Get"):
            if request.id not in self.containers:
                raise GrpcCallError(Code.NOT_FOUND, f"container {request.id!r}: not found")
            return [containers_pb2.GetContainerResponse(
                container=containers_pb2.Container(id=request.id, image=self.containers[request.id]))]
        if path.endswith("Images/Get"):
            if request.name not in self.images:
                raise GrpcCallError(Code.UNAVAILABLE, "containerd is gone")
            d = self.images[request.name]
            target = descriptor_pb2.Descriptor(media_type=d["mediaType"], digest=d["digest"], size=d["size"])
            return [images_pb2.GetImageResponse(image=images_pb2.Image(name=request.name, target=target))]
        data = self.blobs[request.digest]
        chunks = [content_pb2.ReadContentResponse(offset=i, data=data[i:i + self.chunk])
                  for i in range(0, len(data), self.chunk)]
        if self.shuffled:
            chunks.reverse()
        for chunk in chunks:  # as grpc_h2_client hands them over: each as it arrives
            on_message(chunk)
        return []


def find(fake: FakeContainerd, bundle: Path, cid: str = "c1"):
    return asyncio.run(ImageModules("/run/containerd/containerd.sock", fake).find(cid, "k8s.io", bundle))


def test_the_first_wasm_layer_of_a_wasm_image_is_written_into_the_bundle(tmp_path: Path) -> None:
    fake = FakeContainerd()
    fake.image("app", layers=[("application/vnd.oci.image.layer.v1.tar", b"files"), (LAYER, MODULE),
                              ("application/wasm", b"\0asm second")])
    fake.containers["c1"] = "app"
    found = find(fake, tmp_path)
    assert found is not None and found.image == "app"
    assert found.path == tmp_path / "image-layer.wasm" and found.path.read_bytes() == MODULE
    assert found.digest == "sha256:" + hashlib.sha256(MODULE).hexdigest()
    assert all(metadata == (("containerd-namespace", "k8s.io"),) for _, metadata in fake.calls)
    assert [path.rsplit("/", 2)[-2] for path, _ in fake.calls] == [
        "containerd.services.containers.v1.Containers", "containerd.services.images.v1.Images",
        *["containerd.services.content.v1.Content"] * 3]  # manifest, config, layer


def test_an_index_is_resolved_to_its_wasm_platform(tmp_path: Path) -> None:
    fake = FakeContainerd()
    linux = fake.image("linux-only", architecture="amd64", layers=[(LAYER, b"\0asm not this")])
    wasm = fake.image("wasm-only")
    index = fake.blob(INDEX, {"manifests": [{**linux, "platform": {"os": "linux", "architecture": "amd64"}},
                                            {**wasm, "platform": {"os": "wasip1", "architecture": "wasm"}}]})
    fake.images["multi"] = index
    fake.containers["c1"] = "multi"
    found = find(fake, tmp_path)
    assert found is not None and found.path.read_bytes() == MODULE


@pytest.mark.parametrize("case", ["linux architecture", "no wasm layer", "no image", "index without wasm"])
def test_what_is_no_wasm_image_gives_none_and_writes_nothing(tmp_path: Path, case: str) -> None:
    fake = FakeContainerd()
    fake.containers["c1"] = "app"
    if case == "linux architecture":
        fake.image("app", architecture="amd64")
    elif case == "no wasm layer":
        fake.image("app", layers=[("application/vnd.oci.image.layer.v1.tar+gzip", b"files")])
    elif case == "no image":
        fake.containers["c1"] = ""
    else:
        a, b = fake.image("a"), fake.image("b", architecture="arm64")
        fake.images["app"] = fake.blob(INDEX, {"manifests": [{**a, "platform": {"architecture": "amd64"}},
                                                             {**b, "platform": {"architecture": "arm64"}}]})
    assert find(fake, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_layer_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    fake = FakeContainerd()
    target = fake.image("app")
    fake.containers["c1"] = "app"
    manifest = json.loads(fake.blobs[target["digest"]])
    fake.blobs[manifest["layers"][0]["digest"]] = b"\0asm\x01\0\0\x01"  # same size, other bytes
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        find(fake, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the module nor its temporary file


def test_chunks_out_of_order_are_refused_and_a_planted_temporary_file_is_not_written_through(
        tmp_path: Path) -> None:
    fake = FakeContainerd()
    fake.image("app")
    fake.containers["c1"] = "app"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / ".image-layer.wasm.tmp").hardlink_to(victim)
    found = find(fake, tmp_path)
    assert found is not None and found.path.read_bytes() == MODULE and victim.read_bytes() == b"keep"
    fake.shuffled = True
    with pytest.raises(InvalidArgument, match="out of order"):
        find(fake, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image-layer.wasm", "victim"]


def test_a_layer_over_the_limit_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_modules, "MAX_MODULE_BYTES", 4)
    fake = FakeContainerd()
    fake.image("app")
    fake.containers["c1"] = "app"
    with pytest.raises(InvalidArgument, match="at most 4 bytes"):
        find(fake, tmp_path)
    assert sum(path.endswith("Content/Read") for path, _ in fake.calls) == 2  # the manifest and config only


def test_containerd_errors_and_bad_digests_are_clear(tmp_path: Path) -> None:
    fake = FakeContainerd()
    assert find(fake, tmp_path) is None  # no record of the container: no image to read
    fake.containers["c1"] = "app"
    with pytest.raises(FailedPrecondition, match="Images/Get.*UNAVAILABLE: containerd is gone"):
        find(fake, tmp_path)
    fake.images["app"] = {"mediaType": MANIFEST, "digest": "md5:abc", "size": 3}
    with pytest.raises(InvalidArgument, match="not by a sha256 digest"):
        find(fake, tmp_path)
    fake.images["app"] = fake.blob(MANIFEST, b"[1, 2]")
    with pytest.raises(InvalidArgument, match="manifest is not a JSON object"):
        find(fake, tmp_path)


def test_the_json_readers() -> None:
    wasm = {"digest": "w", "platform": {"architecture": "wasm", "os": "wasip1"}}
    assert manifest_of({"manifests": [{"digest": "l", "platform": {"architecture": "amd64"}}, wasm]}) == wasm
    assert manifest_of({"manifests": [{"digest": "only"}]}) == {"digest": "only"}
    assert manifest_of({"manifests": "nonsense"}) is None
    assert is_wasm_image({"architecture": "wasm"}) and not is_wasm_image({"architecture": "amd64"})
    assert wasm_layers({"layers": [{"mediaType": "application/wasm"}, {"mediaType": "x"}, "junk"]}) == [
        {"mediaType": "application/wasm"}]


def test_containerds_grpc_socket_defaults_to_the_one_beside_its_ttrpc_socket() -> None:
    assert containerd_address("/run/containerd/containerd.sock.ttrpc") == "/run/containerd/containerd.sock"
    assert containerd_address("/somewhere/else.sock") == ""
    derived = task_server_options({}, "/x/containerd.sock.ttrpc")
    assert derived["containerd_address"] == "/x/containerd.sock"
    chosen = task_server_options({"containerd_address": "/y/c.sock"}, "/x/containerd.sock.ttrpc")
    assert chosen["containerd_address"] == "/y/c.sock"


def test_containerd_is_asked_only_when_args0_names_nothing_in_the_rootfs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kuasar.common.events import EventPublisher
    from kuasar.common.reaper import Reaper
    from kuasar.wasm.tasks import WasmSettings, WasmTasks

    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "opt").mkdir()
    (rootfs / "app.wasm").write_bytes(MODULE)
    (rootfs / "bin" / "sh").write_bytes(b"\x7fELF")
    (rootfs / "opt" / "tool").write_bytes(b"\x7fELF")
    asked: list[str] = []

    class Recording:
        async def find(self, container_id: str, namespace: str, bundle: Path) -> None:
            asked.append(container_id)
            if container_id == "unreachable":
                raise image_modules.ContainerdUnavailable("containerd is gone")

    tasks = WasmTasks(Reaper(), EventPublisher(""), tmp_path / "dir", WasmSettings(cache=False))
    assert tasks.image_modules is None  # no containerd address: never asked
    container = SimpleNamespace(id="c1", namespace="k8s.io", bundle=tmp_path, rootfs=rootfs)

    def lookup(args: list[str], env: list[str] | None = None) -> list[str]:
        asked.clear()
        asyncio.run(tasks._image_module(container, {"args": args, "env": env or [], "cwd": "/"}))  # type: ignore[arg-type]
        return list(asked)

    assert lookup(["_start"]) == []
    tasks.image_modules = Recording()  # type: ignore[assignment]
    assert lookup(["/app.wasm"]) == [] and lookup(["app.wasm#greet"]) == []  # a module in the rootfs
    assert lookup(["sh", "-c", "true"]) == []  # found on runc's default $PATH: a Linux container
    assert lookup(["tool"]) == ["c1"] and lookup(["tool"], ["PATH=/opt"]) == []
    assert lookup(["_start"]) == ["c1"] and lookup(["/missing.wasm#run"]) == ["c1"]
    assert lookup([]) == []
    # containerd out of reach: as if the image carried no module (the rootfs's error, or runc, follows).
    container.id = "unreachable"
    assert lookup(["_start"]) == ["unreachable"]


def test_an_image_layer_that_is_no_module_is_a_wasm_error_never_one_for_runc(tmp_path: Path) -> None:
    from kuasar.wasm.module import NotAModule
    from kuasar.wasm.tasks import module_of

    layer = tmp_path / "image-layer.wasm"
    layer.write_bytes(MODULE)
    assert module_of(tmp_path / "rootfs", ["/whatever.wasm#greet"], "/", layer) == (layer, "greet")
    for data, words in ((b"#!/bin/sh\n", "not a WebAssembly module"), (b"\0asm\x0e\0\x01\0", "unknown version")):
        layer.write_bytes(data)
        with pytest.raises(InvalidArgument, match=words) as refused:
            module_of(tmp_path / "rootfs", ["_start"], "/", layer)
        assert not isinstance(refused.value, NotAModule)


def test_an_exec_runs_the_containers_layer_when_args0_names_nothing_in_the_rootfs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kuasar.wasm.tasks import runnable_module

    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "app.wasm").write_bytes(MODULE)
    (rootfs / "bin" / "probe").write_bytes(MODULE)
    layer = tmp_path / "image-layer.wasm"
    layer.write_bytes(MODULE)
    from_layer = SimpleNamespace(rootfs=rootfs, image_module=layer, runtime="wasmtime")
    from_rootfs = SimpleNamespace(rootfs=rootfs, image_module=None, runtime="wasmtime")

    def exec_of(container: SimpleNamespace, args: list[str]) -> tuple[Path, str]:
        return runnable_module(container, args, "/", container.image_module)  # type: ignore[arg-type]

    assert exec_of(from_layer, ["healthy#greet"]) == (layer, "greet")  # args[0] chooses the export
    assert exec_of(from_layer, ["/anything.wasm"]) == (layer, "_start")
    assert exec_of(from_layer, ["/app.wasm#greet"]) == (rootfs / "app.wasm", "greet")  # a module in the rootfs
    # An exec runs modules only: a name on $PATH (which at Create means a Linux container) is the layer's export.
    assert exec_of(from_layer, ["probe"]) == (layer, "_start")
    assert exec_of(from_layer, ["/bin/probe"]) == (rootfs / "bin" / "probe", "_start")
    # A container whose module was in its rootfs: an exec names a module there, as before.
    with pytest.raises(InvalidArgument, match="not found in the container's rootfs"):
        exec_of(from_rootfs, ["healthy#greet"])
    with pytest.raises(InvalidArgument, match="is not module.wasm#function"):
        exec_of(from_layer, ["#greet"])
