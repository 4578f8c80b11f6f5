"""Finding the commands a dead process left running, believing only the ones that run our program."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kuasar.common import proc_stat, strays

MARK = "kuasar-test-strays-commands"
SLEEPER = ["-c", "import time; time.sleep(60)", MARK]


def _marked(argv: list[bytes]) -> bool:
    return MARK.encode() in argv


def _settle(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 5
    while MARK.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_command_of_our_program_is_found_with_its_arguments(running: list[subprocess.Popen]) -> None:
    running.append(subprocess.Popen([sys.executable, *SLEEPER]))
    _settle(running[0])
    found = strays.commands_of(sys.executable, _marked)
    assert [(pid, start) for pid, start, _ in found] == [(running[0].pid, proc_stat.start_time(running[0].pid))]
    assert found[0][2][-2] == MARK.encode()


def test_the_same_arguments_from_another_program_are_not_believed(running: list[subprocess.Popen],
                                                                   tmp_path: Path) -> None:
    # What a process says in its arguments is anyone's to say; the file it runs is not.
    impostor = tmp_path / "python3"
    shutil.copy2(Path(sys.executable).resolve(), impostor)
    running.append(subprocess.Popen([str(impostor), *SLEEPER]))
    _settle(running[0])
    assert strays.processes_with(_marked) != []  # the command line alone would have named it
    assert strays.commands_of(sys.executable, _marked) == []
    assert strays.commands_of(shutil.which("sleep") or "/bin/sleep", _marked) == []


def test_descendants_of_a_process_are_found_however_deep(running: list[subprocess.Popen]) -> None:
    # A child that starts a grandchild (as a hook runs what it runs) and prints the grandchild's pid.
    running.append(subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                     f"p = subprocess.Popen([sys.executable, *{SLEEPER!r}]); "
                                     "print(p.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE))
    grandchild = int(running[0].stdout.readline())  # type: ignore[union-attr]
    child = running[0].pid
    found = dict(strays.descendants_of({os.getpid()}))
    assert found[child] == proc_stat.start_time(child) and found[grandchild] == proc_stat.start_time(grandchild)
    assert [pid for pid, _ in strays.descendants_of({child})] == [grandchild]
    os.kill(grandchild, 9)


def test_kill_strays_ends_the_sandboxs_helpers_only(tmp_path: Path) -> None:
    # Matched by its directory in a command line, an operator's `tail -f <dir>/console.log` (or a log
    # shipper's) was SIGKILLed with the VM's leftovers.
    vm_dir = tmp_path / "vm" / "abc"
    vm_dir.mkdir(parents=True)
    (vm_dir / "console.log").write_text("")
    helper = subprocess.Popen(["sleep", "60"], env=strays.owner_env(vm_dir))
    other_vm = subprocess.Popen(["sleep", "60"], env=strays.owner_env(tmp_path / "vm" / "abcd"))
    onlooker = subprocess.Popen(["tail", "-f", str(vm_dir / "console.log")])
    try:
        assert asyncio.run(strays.kill_strays(vm_dir)) == [helper.pid]
        assert helper.wait(5) == -9
        assert other_vm.poll() is None and onlooker.poll() is None
    finally:
        for proc in (helper, other_vm, onlooker):
            proc.kill()
            proc.wait()
