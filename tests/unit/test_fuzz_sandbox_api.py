"""Generated Sandbox API calls (random ids including path traversal, random fields, random order)
against the real gRPC server and SandboxController over the in-memory sandbox type.

Every answer must be one a well-behaved controller gives (OK, INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, FAILED_PRECONDITION; never UNKNOWN or INTERNAL), must be the one a small model of the
lifecycle predicts, and no file may ever appear outside `<state>/<valid id>/sandbox.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2 as pb
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
from kuasar.common.api.containerd.types import mount_pb2
from kuasar.common.controller import SandboxController
from kuasar.common.errors import InvalidArgument
from kuasar.common.ids import validate_id
from kuasar.common.sandbox_api import SandboxApiServer
from kuasar.common.state import STATE_FILE
from tests.unit.test_sandbox_api import MemorySandboxer, create_request

MAX_EXAMPLES = int(os.environ.get("KUASAR_FUZZ_SEQUENCES", "800"))
# A Wait on a sandbox that has not exited blocks by design; the client gives up after this. Any other
# Wait must be answered within it, also on a loaded machine (0.05 s was seen to be too short).
WAIT_PROBE = 0.1
S = grpc.StatusCode
ALLOWED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.ALREADY_EXISTS, S.FAILED_PRECONDITION}

# A few valid ids the calls keep hitting (so lifecycles happen), and ids that try to escape the state dir.
VALID_IDS = ["a" * 64, "pod-1", "x.y_z", "A9"]
HOSTILE_IDS = ["", ".", "..", "../../etc", "../state", "/etc/passwd", "a/../b", "a/b", "a\x00b", "%2e%2e",
               "..\\..", "x" * 77, "-lead", "trail-", "sp ace", "a..b", "a\nb", "ｆｕｌｌ", "~root", "$HOME", "*"]


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with weights (hypothesis' own one_of favours its first, simplest branches)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


ids = weighted((6, st.sampled_from(VALID_IDS)), (2, st.sampled_from(HOSTILE_IDS)), (2, st.text(max_size=90)))
texts = st.text(max_size=40)
string_maps = st.dictionaries(texts, texts, max_size=3)
hostile_paths = st.one_of(texts, st.sampled_from(["/proc/1/ns/net", "../../../../etc/shadow", "/", "/dev/null"]))
metadata_values = weighted(
    (3, st.none()), (1, st.just(b"")), (1, st.binary(max_size=40)),
    (3, st.recursive(st.none() | st.booleans() | st.integers() | texts,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                     max_leaves=6).map(lambda v: json.dumps(v).encode())))


@dataclass
class Call:
    method: str
    sandbox_id: str
    request: object
    bad_metadata: bool = False  # Create only: an extension CRI would never send


@st.composite
def create_calls(draw: st.DrawFn, sandbox_id: str) -> Call:
    request = create_request(sandbox_id) if draw(st.booleans()) else pb.ControllerCreateRequest(
        sandbox_id=sandbox_id)
    request.sandboxer = draw(texts)
    request.netns_path = draw(hostile_paths)
    if draw(st.booleans()):
        request.options.CopyFrom(any_pb2.Any(type_url=draw(texts), value=draw(st.binary(max_size=64))))
    for _ in range(draw(st.integers(0, 2))):
        request.rootfs.append(mount_pb2.Mount(type=draw(texts), source=draw(hostile_paths),
                                              target=draw(hostile_paths), options=draw(st.lists(texts, max_size=3))))
    request.annotations.update(draw(string_maps))
    request.sandbox.labels.update(draw(string_maps))
    metadata = draw(metadata_values)
    bad = False
    if metadata is not None:
        request.sandbox.extensions["metadata"].value = metadata
        if metadata:
            try:
                bad = not isinstance(json.loads(metadata), dict)  # containerd's is its Metadata object
            except ValueError:
                bad = True
    return Call("Create", sandbox_id, request, bad)


@st.composite
def calls(draw: st.DrawFn, primary: str) -> Call:
    """A call on the sequence's primary sandbox half the time (so whole lifecycles happen), else anywhere."""
    sandbox_id = draw(weighted((1, st.just(primary)), (1, ids)))
    method = draw(st.sampled_from(["Create", "Create", "Start", "Start", "Stop", "Wait", "Status", "Shutdown",
                                   "Metrics", "Platform", "Update"]))
    sandboxer = draw(texts)
    if method == "Create":
        return draw(create_calls(sandbox_id))
    if method == "Stop":
        return Call(method, sandbox_id, pb.ControllerStopRequest(
            sandbox_id=sandbox_id, timeout_secs=draw(st.integers(0, 2**32 - 1)), sandboxer=sandboxer))
    if method == "Status":
        return Call(method, sandbox_id, pb.ControllerStatusRequest(sandbox_id=sandbox_id, verbose=draw(st.booleans()),
                                                                   sandboxer=sandboxer))
    if method == "Update":
        request = pb.ControllerUpdateRequest(sandbox_id=sandbox_id, sandboxer=sandboxer)
        request.fields.extend(draw(st.lists(st.one_of(st.just("labels"), texts.map(lambda t: f"extensions.{t}"),
                                                      texts), max_size=4)))
        request.sandbox.labels.update(draw(string_maps))
        for name in draw(st.lists(texts, max_size=2)):
            request.sandbox.extensions[name].value = draw(st.binary(max_size=32))
        return Call(method, sandbox_id, request)
    request_type = {"Start": pb.ControllerStartRequest, "Wait": pb.ControllerWaitRequest,
                    "Shutdown": pb.ControllerShutdownRequest, "Metrics": pb.ControllerMetricsRequest,
                    "Platform": pb.ControllerPlatformRequest}[method]
    return Call(method, sandbox_id, request_type(sandbox_id=sandbox_id, sandboxer=sandboxer))


def is_valid(sandbox_id: str) -> bool:
    try:
        validate_id(sandbox_id)
    except InvalidArgument:
        return False
    return True


class Model:
    """What the controller must answer, given what it was told before (state per valid id)."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}

    def expect(self, call: Call) -> set[grpc.StatusCode]:
        sid, state = call.sandbox_id, self.state.get(call.sandbox_id)
        if not sid or not is_valid(sid) or (call.method == "Create" and call.bad_metadata):
            return {S.INVALID_ARGUMENT}
        if call.method == "Create":
            if state is not None:
                return {S.ALREADY_EXISTS}
            self.state[sid] = "created"
            return {S.OK}
        if call.method in ("Stop", "Shutdown"):
            if call.method == "Shutdown":
                self.state.pop(sid, None)
            elif state is not None:
                self.state[sid] = "stopped"
            return {S.OK}  # an unknown sandbox is already stopped / gone
        if state is None:
            return {S.NOT_FOUND}
        if call.method == "Start":
            if state == "stopped":
                return {S.FAILED_PRECONDITION}
            self.state[sid] = "ready"
            return {S.OK}
        if call.method == "Wait":
            return {S.OK} if state == "stopped" else {S.DEADLINE_EXCEEDED}
        return {S.OK}


class Harness:
    """One server for the whole test, on an event loop that runs while a call is in flight."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        # grpc.aio binds servers and channels to the loop running when they are made.
        self.controller = SandboxController(MemorySandboxer(), self.state_dir)
        self.server = SandboxApiServer(self.controller, self.root / "api.sock")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"unix://{self.root / 'api.sock'}")
        await self.channel.channel_ready()  # the first probe must not pay for the connection
        self.stub = pb_grpc.ControllerStub(self.channel)

    def call(self, call: Call) -> tuple[grpc.StatusCode, object]:
        rpc = getattr(self.stub, call.method)
        timeout = WAIT_PROBE if call.method == "Wait" else 10.0

        async def run() -> tuple[grpc.StatusCode, object]:
            try:
                return S.OK, await rpc(call.request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                return err.code(), err.details()

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.run_until_complete(self.server.stop(0))
        self.loop.run_until_complete(self.controller.close())
        self.loop.close()

    def files_outside_state(self) -> list[str]:
        """Anything under root but `api.sock` and `state/<valid id>/sandbox.json`."""
        bad = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                path = rel / name
                ok = (str(path) == "api.sock" or (len(path.parts) == 3 and path.parts[0] == "state"
                                                   and is_valid(path.parts[1]) and name == STATE_FILE))
                if not ok:
                    bad.append(str(path))
            for name in dirnames:
                path = rel / name
                if not (str(path) == "state" or (len(path.parts) == 2 and path.parts[0] == "state"
                                                  and is_valid(name))):
                    bad.append(str(path) + "/")
        return bad


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "root")
    yield h
    h.close()


def test_generated_call_sequences_get_only_expected_codes_and_stay_inside_the_state_dir(
        harness: Harness, tmp_path: Path, record_property) -> None:
    outside_before = sorted(os.listdir(tmp_path.parent))
    seen: Counter[str] = Counter()
    started = time.monotonic()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(sequence=st.sampled_from(VALID_IDS).flatmap(lambda primary: st.lists(calls(primary), min_size=1,
                                                                                max_size=12)))
    def sequences(sequence: list[Call]) -> None:
        model = Model()
        seen["sequences"] += 1
        for call in sequence:
            expected = model.expect(call)
            code, detail = harness.call(call)
            seen[f"{call.method}:{code.name}"] += 1
            assert code in ALLOWED or (call.method == "Wait" and code == S.DEADLINE_EXCEEDED), (
                f"{call.method}({call.sandbox_id!r}) -> {code.name}: {detail}")
            assert code in expected, f"{call.method}({call.sandbox_id!r}) -> {code.name} ({detail}), " \
                                     f"expected {sorted(c.name for c in expected)}"
            if call.method == "Status" and code == S.OK:
                assert detail.state == ("SANDBOX_READY" if model.state[call.sandbox_id] == "ready"
                                        else "SANDBOX_NOTREADY")
                assert detail.pid == 0 or model.state[call.sandbox_id] == "ready"
                if call.request.verbose:
                    assert json.loads(detail.info["info"])["pid"] == detail.pid
            assert harness.files_outside_state() == []
        # Leave nothing for the next sequence: Shutdown is how containerd forgets a sandbox.
        for sandbox_id in list(model.state):
            code, detail = harness.call(Call("Shutdown", sandbox_id, pb.ControllerShutdownRequest(
                sandbox_id=sandbox_id)))
            assert code == S.OK, detail
        assert os.listdir(harness.state_dir) == []
        assert harness.controller.records == {}

    sequences()
    calls_run = sum(v for k, v in seen.items() if k != "sequences")
    print(f"\nsandbox_api: {seen['sequences']} sequences, {calls_run} calls in {time.monotonic() - started:.1f}s")
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(seen.items()) if k != "sequences"))
    record_property("sandbox_api_sequences", seen["sequences"])
    record_property("sandbox_api_calls", calls_run)
    assert not any(k.endswith((":UNKNOWN", ":INTERNAL")) for k in seen)
    assert sorted(os.listdir(tmp_path.parent)) == outside_before
    assert os.listdir(tmp_path) == ["root"]
