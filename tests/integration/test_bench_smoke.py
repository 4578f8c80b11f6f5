"""`make bench-smoke` in a subprocess: the benchmark code runs end to end and writes sane outputs.

No thresholds: the numbers only have to exist and be positive, for both handlers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from kuasar.common import cgroups

from .conftest import integration_skip_reason

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 240


def test_bench_smoke_writes_json_report_and_plots(tmp_path: Path) -> None:
    reason = integration_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "bench"
    token = secrets.randbelow(50)
    parent = f"kuasar-bench-smoke-{token}"  # every pod a kubelet-style cgroup parent, gone afterwards
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--out", str(out),
         "--bridge", f"kuasar-bt{token}", "--subnet", f"10.{150 + token}.0.0/16", "--pod-cgroup-parent", parent],
        cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    data = json.loads((out / "results.json").read_text())
    for label in ("stock", "ours"):
        serial = data["serial"][label]
        assert len(serial["total_ms"]) == 3
        for key in ("total_ms", "run_pod_ms", "create_ms", "start_ms", "teardown_ms"):
            assert all(v > 0 for v in serial[key]), (label, key, serial[key])
        parallel = data["parallel"]["3"][label]
        assert len(parallel["latency_ms"]) == 3 and parallel["errors"] == []
        assert all(v > 0 for v in parallel["latency_ms"]) and len(parallel["wall_ms"]) == 1
        assert parallel["wall_ms"][0] > 0 and parallel["teardown_wall_ms"][0] > 0
        memory = {row["pods"]: row for row in data["memory"][label]}
        assert {1, 3} <= set(memory)
        assert all(memory[n]["management"]["pss_kb"] > 0 for n in (1, 3))
        assert all(memory[n]["containerd"]["pss_kb"] > 0 for n in (1, 3))
    # Each side's process set is what the issue defines.
    assert data["memory"]["stock"][-1]["parts"]["shims"]["processes"] == 3
    assert data["memory"]["stock"][-1]["parts"]["pause"]["processes"] == 3
    assert data["memory"]["ours"][-1]["parts"]["pod_processes"]["processes"] == 3
    for floor in (data["floor"], data["floor_interleaved"]):  # in a loop of its own; between the serial pods
        assert set(floor) == {"run_ms", "delete_ms", "create_ms", "start_ms"}
        assert all(len(values) == 3 and all(v > 0 for v in values) for values in floor.values()), floor
    assert "between the serial pods" in data["summary"]["targets"][-1]["detail"]  # the two floors named
    # Our serial starts split by where the time went: our daemons timed their requests and runc commands.
    split = data["attribution"]
    assert split["pods"] == 3
    for call in ("RunPodSandbox", "StartContainer"):
        assert split["calls"][call]["ours"]["min"] > 0, (call, split["calls"][call])
    assert split["calls"]["StartContainer"]["runc"]["min"] > 0  # `runc create` runs inside StartContainer
    assert split["calls"]["CreateContainer"]["runc"]["max"] == 0
    for part in ("containerd", "ours", "runc"):
        assert split["calls"]["start total"][part]["min"] >= 0
    assert 0 < split["without_ours_ms"]["p50"] < data["summary"]["serial"]["ours"]["total_ms"]["max"]
    requests = {(r["kind"], r["method"]): r for r in split["requests"]}
    for key in (("sandbox", "Create"), ("sandbox", "Start"), ("ttrpc", "Task/Create"), ("runc", "create")):
        assert requests[key]["per_start"] == 1, (key, requests[key])
    # runc create runs inside the Task API's Create: the request's own time is what is left of it
    assert 0 < requests[("ttrpc", "Task/Create")]["own_ms"]["p50"] < requests[("runc", "create")]["ms"]["p50"]
    assert not [key for key in requests if key[1].endswith("Wait")]
    assert data["summary"]["ratios"]["serial_p50"] > 0
    assert {t["name"] for t in data["summary"]["targets"]}
    cleanup = data["cleanup"]
    assert cleanup["pods_left"] == 0 and cleanup["leftover_mounts"] == []
    assert not [note for note in cleanup["notes"] if "left in place" in note], cleanup["notes"]
    assert "left in place" not in proc.stderr  # no pod's cgroup removal found its parent busy
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{parent}")) and not Path("/sys/fs/cgroup", parent).exists()
    # Nor below the cgroup the benchmark runs in (not the root everywhere: here the memory hierarchy's),
    # where runc puts a relative parent's containers.
    own = {name: path for name, path in cgroups.proc_cgroups(os.getpid()).items() if path != "/"}
    assert not [name for name, path in own.items() if Path("/sys/fs/cgroup", name, path.lstrip("/"), parent).exists()]

    # The other sections: each ran once (or was skipped for a stated reason), none failed.
    for name in ("wasm", "vm", "gvisor"):
        assert "failed" not in data[name], (name, data[name])
        assert set(data[name]) != {"skipped"} or data[name]["skipped"], name
    if "series" in data["wasm"]:
        assert {(s["sandboxer"], s["cache"]) for s in data["wasm"]["series"]} >= {("runc", "-"), ("wasm", "cold"),
                                                                                  ("wasm", "cached")}
        assert all(len(s["start_ms"]) == 1 and s["start_ms"][0] > 0 for s in data["wasm"]["series"])
    if "pod_s" in data["vm"]:
        assert len(data["vm"]["pod_s"]) == 1 and data["vm"]["pod_s"][0] > 0 and data["vm"]["bare_s"][0] > 0
    if "start" in data["gvisor"]:
        for label in ("stock", "ours", "gvisor"):
            assert len(data["gvisor"]["start"][label]["total_ms"]) == 1, label
        loaded = data["gvisor"]["memory"][-1]
        assert loaded["pods"] == 1 and loaded["parts"]["runsc_sandbox"]["processes"] == 1
        assert loaded["management"]["pss_kb"] > 0

    report = (out / "report.md").read_text()
    assert f"CRI cgroup parent `{parent}/pod<uid>`" in report
    for needle in ("## Targets", "## Serial start", "### Where our serial start goes", "## Parallel start",
                   "## Management memory", "## Floor",
                   "## wasm container start", "## VM pod ready", "## gVisor", "stock", "ours"):
        assert needle in report
    for png in ("serial_cdf.png", "parallel_cdf.png", "pss.png", "serial_breakdown.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
