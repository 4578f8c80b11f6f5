"""kuasar-ctl end to end: a private containerd 2.1 + runc-sandboxer (the shared `stack` fixture), driven
only through the command line, the way a person or a script would (tables and --json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import BUSYBOX, HANDLER, Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def ctl_state(tmp_path_factory: pytest.TempPathFactory):
    """kuasar-ctl remembers pod configs in $KUASAR_CTL_STATE: a private one, not the machine's /run/kuasar/ctl."""
    old = os.environ.get("KUASAR_CTL_STATE")
    os.environ["KUASAR_CTL_STATE"] = str(tmp_path_factory.mktemp("ctl-state"))
    yield Path(os.environ["KUASAR_CTL_STATE"])
    if old is None:
        os.environ.pop("KUASAR_CTL_STATE", None)
    else:
        os.environ["KUASAR_CTL_STATE"] = old


def ctl(stack: Stack, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kuasar.ctl.cli", "-r", stack.address, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def ctl_json(stack: Stack, *args: str) -> dict:
    return json.loads(ctl(stack, "--json", *args).stdout)


def sandboxer_flags(stack: Stack) -> list[str]:
    return ["--type", "runc", "--address", str(stack.sandboxer_socket), "--dir", str(stack.sandboxer_dir)]


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_pod_and_container_lifecycle_with_flags(stack: Stack, tmp_path: Path, ctl_state: Path) -> None:
    log_dir = tmp_path / "pod-logs"
    pod_id = ctl(stack, "runp", "--runtime", HANDLER, "--name", "ctl-web", "--namespace", "ctl-test",
                 "--log-dir", str(log_dir), "--label", "app=web").stdout.strip()
    assert len(pod_id) == 64
    assert (ctl_state / "pods" / f"{pod_id}.json").is_file()  # what `create` passes back to CRI
    try:
        listed = ctl_json(stack, "pods", "--namespace", "ctl-test")["items"]
        assert [p["id"] for p in listed] == [pod_id]
        assert listed[0]["state"] == "SANDBOX_READY" and listed[0]["runtime_handler"] == HANDLER
        assert listed[0]["labels"]["app"] == "web"
        table = ctl(stack, "pods").stdout
        assert table.splitlines()[0].split()[:3] == ["POD", "ID", "CREATED"]
        assert "ctl-web" in table and pod_id[:13] in table and "READY" in table
        assert ctl(stack, "pods", "-q", "--name", "ctl-web").stdout.split() == [pod_id]

        # The sandboxer's own view of the same pod, over its Controller socket and state dir.
        sandboxes = ctl_json(stack, "sandboxes", "ls", *sandboxer_flags(stack))["sandboxes"]
        mine = [s for s in sandboxes if s["id"] == pod_id]
        assert mine and mine[0]["state"] == "ready" and mine[0]["live"] and mine[0]["name"] == "ctl-web"
        status = ctl_json(stack, "sandbox", "status", pod_id[:12], *sandboxer_flags(stack))
        assert status["state"] == "SANDBOX_READY" and status["address"].startswith("ttrpc+unix://")
        assert "ctl-web" in ctl(stack, "sandboxes", "ls", *sandboxer_flags(stack)).stdout
        shell = ctl(stack, "sandbox", "shell", pod_id, *sandboxer_flags(stack), check=False)
        assert shell.returncode == 1 and "no guest" in shell.stderr

        # create (pod config read back from containerd), start, logs, exec.
        cid = ctl(stack, "create", pod_id[:10], "--image", BUSYBOX, "--name", "c1", "--env", "GREETING=hi", "--",
                  "sh", "-c", 'echo "$GREETING from kuasar-ctl"; echo to-stderr >&2; exec sleep 300').stdout.strip()
        assert len(cid) == 64
        assert ctl_json(stack, "ps", "-a", "--pod", pod_id)["containers"][0]["state"] == "CONTAINER_CREATED"
        assert ctl(stack, "start", cid[:8]).stdout.strip() == cid
        logs = wait_for(lambda: (r := ctl(stack, "logs", cid)) and "hi from kuasar-ctl" in r.stdout and r,
                        "the container's output in `logs`")
        assert "to-stderr" in logs.stderr and "to-stderr" not in logs.stdout
        assert (log_dir / "c1" / "0.log").is_file()  # kubelet's layout under the pod's log directory
        stamped = ctl(stack, "logs", "--timestamps", "--tail", "2", cid)
        lines = stamped.stdout.splitlines() + stamped.stderr.splitlines()
        assert len(lines) == 2 and all(line[:4].isdigit() for line in lines)
        assert stamped.stdout.rstrip().endswith("hi from kuasar-ctl")
        tail = ctl(stack, "logs", "--tail", "1", cid)
        assert len((tail.stdout + tail.stderr).splitlines()) == 1

        res = ctl(stack, "exec", cid, "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
        assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
        data = json.loads(ctl(stack, "exec", "--json", cid, "--", "hostname", check=False).stdout)
        assert data["exit_code"] == 0 and data["stdout"].strip()
        interactive = ctl(stack, "exec", "-it", cid, "--", "sh", check=False)
        assert interactive.returncode == 1 and "not available" in interactive.stderr

        running = ctl(stack, "ps").stdout
        assert cid[:13] in running and "RUNNING" in running and "ctl-web" in running
        assert cid in ctl(stack, "ps", "-q", "--no-trunc").stdout.split()
        inspected = json.loads(ctl(stack, "inspect", cid).stdout)
        assert inspected["status"]["state"] == "CONTAINER_RUNNING"
        assert inspected["info"]["info"]["sandboxID"] == pod_id
        inspected_pod = json.loads(ctl(stack, "inspectp", pod_id).stdout)
        assert inspected_pod["status"]["metadata"]["name"] == "ctl-web"

        refused = ctl(stack, "rm", cid, check=False)
        assert refused.returncode == 1 and "running" in refused.stderr
        assert ctl(stack, "stop", "-t", "0", cid).stdout.strip() == cid
        exited = ctl_json(stack, "ps", "-a", "--pod", pod_id)["containers"]
        assert [c["state"] for c in exited] == ["CONTAINER_EXITED"]
        assert cid not in ctl(stack, "ps", "-q", "--no-trunc").stdout  # not running any more
        assert ctl_json(stack, "rm", cid)["ids"] == [cid]
        assert ctl_json(stack, "ps", "-a", "--pod", pod_id)["containers"] == []

        refused = ctl(stack, "rmp", pod_id, check=False)
        assert refused.returncode == 1 and "stop it first" in refused.stderr
        assert ctl(stack, "stopp", pod_id).stdout.strip() == f"Stopped sandbox {pod_id}"
        assert ctl_json(stack, "pods", "--namespace", "ctl-test")["items"][0]["state"] == "SANDBOX_NOTREADY"
        assert ctl(stack, "rmp", pod_id).stdout.strip() == f"Removed sandbox {pod_id}"
        assert not (ctl_state / "pods" / f"{pod_id}.json").exists()
        assert ctl_json(stack, "pods", "--namespace", "ctl-test")["items"] == []
        gone = ctl(stack, "sandbox", "status", pod_id, *sandboxer_flags(stack), check=False)
        assert gone.returncode == 1
    finally:
        ctl(stack, "rmp", "-f", pod_id, check=False)


def test_crictl_style_json_files(stack: Stack, tmp_path: Path) -> None:
    """`runp pod.json`, `create POD container.json pod.json`, then `rmp -f` with the container running."""
    pod_file = tmp_path / "pod.json"
    pod_file.write_text(json.dumps({
        "metadata": {"name": "ctl-files", "namespace": "ctl-test", "uid": "ctl-files-uid", "attempt": 1},
        "log_directory": str(tmp_path / "logs"),
        "linux": {"security_context": {"namespace_options": {"network": 2, "pid": 1}}},
    }))
    container_file = tmp_path / "container.json"
    container_file.write_text(json.dumps({
        "metadata": {"name": "files"}, "image": {"image": BUSYBOX},
        "command": ["sh", "-c", "echo from-json-files; exec sleep 300"], "log_path": "files.log",
    }))
    out = ctl_json(stack, "runp", "--runtime", HANDLER, str(pod_file))
    pod_id = out["id"]
    assert out["name"] == "ctl-files" and out["runtime"] == HANDLER
    try:
        cid = ctl(stack, "create", "--start", pod_id, str(container_file), str(pod_file)).stdout.strip()
        wait_for(lambda: "from-json-files" in ctl(stack, "logs", cid).stdout, "output of the JSON-file container")
        assert (tmp_path / "logs" / "files.log").is_file()
        pods = ctl_json(stack, "pods", "--name", "ctl-files")["items"]
        assert pods[0]["metadata"]["attempt"] == 1 and pods[0]["metadata"]["uid"] == "ctl-files-uid"
        images = ctl(stack, "images").stdout
        assert "localhost/kuasar/busybox" in images and "IMAGE ID" in images
        assert any(BUSYBOX in i.get("repo_tags", []) for i in ctl_json(stack, "images")["images"])
        assert ctl_json(stack, "rmp", "-f", pod_id)["ids"] == [pod_id]
        assert ctl_json(stack, "ps", "-a", "--name", "files")["containers"] == []
    finally:
        ctl(stack, "rmp", "-f", pod_id, check=False)


def test_errors_are_one_clear_line(stack: Stack, tmp_path: Path) -> None:
    res = ctl(stack, "start", "no-such-container", check=False)
    assert res.returncode == 1 and "no container with id 'no-such-container'" in res.stderr
    res = subprocess.run([sys.executable, "-m", "kuasar.ctl.cli", "--timeout", "2", "-r",
                          str(tmp_path / "nothing.sock"), "pods"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no socket at" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = ctl(stack, "runp", str(bad), check=False)
    assert res.returncode == 1 and "is not JSON" in res.stderr
    version = ctl_json(stack, "version")
    assert version["runtime_name"] == "containerd" and version["kuasar_ctl_version"]
