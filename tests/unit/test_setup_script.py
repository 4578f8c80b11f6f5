"""scripts/setup.sh's steps, run by bash with the script sourced (which only defines its functions) and
apt, dpkg and the fetches replaced by shell functions: nothing here touches the machine's packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup.sh"
SOURCE_GUARD = '[[ "${BASH_SOURCE[0]}" == "$0" ]]'


def run_sourced(tmp_path: Path, script: str, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess:
    """bash: source setup.sh, then SCRIPT. $CALLS is a file the stubs append to, $PREFIX a temp dir."""
    # Sourcing a setup.sh that runs its steps when sourced would install things: refuse.
    assert SOURCE_GUARD in SETUP.read_text(), "scripts/setup.sh runs its steps when sourced"
    env = {"PATH": path, "HOME": str(tmp_path), "KUASAR_PREFIX": str(tmp_path / "prefix"),
           "VENV": str(tmp_path / "venv"), "CALLS": str(tmp_path / "calls"), "STATE": str(tmp_path)}
    (tmp_path / "calls").touch()
    return subprocess.run(["bash", "-c", f'source "$1"\n{script}', "bash", str(SETUP)],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


def test_sourcing_defines_only_and_puts_sbin_on_path(tmp_path: Path) -> None:
    # `su` without `-` leaves root's sbin directories out; dpkg needs ldconfig from there.
    out = run_sourced(tmp_path, 'echo "$PATH"; declare -F main step_packages >/dev/null && echo defined')
    assert out.returncode == 0, out.stderr
    path, defined = out.stdout.splitlines()
    assert {"/usr/sbin", "/sbin"} <= set(path.split(":")) and defined == "defined"
    assert not (tmp_path / "prefix").exists()  # no step ran


def test_held_package_counts_as_installed(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, r"""
dpkg-query() {
    case "${@: -1}" in held) printf 'hi ' ;; inst) printf 'ii ' ;; unpacked) printf 'iU ' ;;
                       removed) printf 'rc ' ;; *) return 1 ;; esac
}
missing_packages held inst unpacked removed unknown""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["unpacked", "removed", "unknown"]


# apt-get and dpkg as a machine where apt-daily holds the lists' lock for the first update and a
# dpkg run was cut short: apt-get install refuses until `dpkg --configure -a`.
APT_STUBS = r"""
APT_LOCK_POLL_S=0
apt-get() {
    echo "apt-get $*" >>"$CALLS"
    case " $* " in
        *" update "*)
            if [[ ! -e "$STATE/lock-released" ]]; then
                touch "$STATE/lock-released"
                echo "E: ${UPDATE_ERROR:-Could not get lock /var/lib/apt/lists/lock. It is held by process 9}" >&2
                return 100
            fi ;;
        *" install "*)
            if [[ ! -e "$STATE/configured" ]]; then
                echo "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct the problem." >&2
                return 100
            fi
            touch "$STATE/installed" ;;
    esac
}
dpkg() {
    echo "dpkg $*" >>"$CALLS"
    case "$1" in
        --audit) [[ -e "$STATE/configured" || -n "${NOT_INTERRUPTED:-}" ]] || echo "make  not fully installed" ;;
        --configure|--force-confdef) touch "$STATE/configured" ;;
    esac
}
dpkg-query() { [[ -e "$STATE/installed" ]] && printf 'ii '; }
DPKG_UPDATES_DIR="$STATE/no-such-dir"
"""


def test_apt_waits_for_the_lists_lock_and_finishes_an_interrupted_dpkg(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, APT_STUBS + "install_packages make gcc")
    assert out.returncode == 0, out.stdout + out.stderr
    seq = calls(tmp_path)
    apt = [c for c in seq if c.startswith("apt-get")]
    assert all("-o DPkg::Lock::Timeout=" in c for c in apt)
    # the update is tried again while the lock is held; the install again once dpkg's run is finished
    kinds = ["update" if " update" in c else "install" if " install " in c else c for c in seq if "--audit" not in c]
    assert kinds == ["update", "update", "install", "dpkg --force-confdef --force-confold --configure -a", "install"]
    # never a conffile prompt: setup may run with no terminal (CI), where dpkg stops at EOF
    assert all("Dpkg::Options::=--force-confdef" in c and "Dpkg::Options::=--force-confold" in c for c in apt)
    assert "finishing an interrupted dpkg run" in out.stdout


def test_apt_update_gives_up_at_once_on_other_errors(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, APT_STUBS + 'UPDATE_ERROR="Failed to fetch http://mirror.invalid/x"\n'
                      "install_packages make")
    assert out.returncode != 0 and "apt-get update failed" in out.stderr
    assert len(calls(tmp_path)) == 1 and " update" in calls(tmp_path)[0]


def test_no_configure_when_dpkg_was_not_interrupted(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, APT_STUBS + "NOT_INTERRUPTED=1\ninstall_packages make")
    assert out.returncode != 0 and "apt-get install failed" in out.stderr
    assert not any("--configure" in c for c in calls(tmp_path))


def test_python_is_installed_when_the_machine_has_none(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, r"""
find_python() { [[ -e "$STATE/python" ]] && echo /usr/bin/python3; }
install_packages() { echo "install $*" >>"$CALLS"; touch "$STATE/python"; }
step_python
echo "PY=$PY" """)
    assert out.returncode == 0, out.stderr
    assert calls(tmp_path) == ["install python3 python3-venv"] and out.stdout.strip() == "PY=/usr/bin/python3"


def test_no_suitable_python_even_after_install_is_an_error(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, "find_python() { return 1; }\ninstall_packages() { :; }\nstep_python")
    assert out.returncode != 0 and "Python >= 3.11 is required" in out.stderr


FAKE_CONTAINERD = "#!/bin/sh\necho 'containerd github.com/containerd/containerd/v2 2.1.9+unknown 0123'\n"


@pytest.mark.parametrize("tools", [(), ("ctr",), ("ctr", "containerd-shim-runc-v2")])
def test_containerd_without_its_tools_is_installed_again(tmp_path: Path, tools: tuple[str, ...]) -> None:
    bin_dir = tmp_path / "prefix" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in [("containerd", FAKE_CONTAINERD), *((t, "#!/bin/sh\n") for t in tools)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = run_sourced(tmp_path, r"""
install_containerd_from_unstable() {
    echo install >>"$CALLS"
    for t in ctr containerd-shim-runc-v2; do printf '#!/bin/sh\n' >"$PREFIX/bin/$t"; chmod +x "$PREFIX/bin/$t"; done
}
step_containerd""", path=f"{bin_dir}:/usr/bin:/bin")  # the prefix first: no system containerd is used
    assert out.returncode == 0, out.stderr
    complete = len(tools) == 2
    assert calls(tmp_path) == ([] if complete else ["install"])
    assert ("present in" if complete else "installed in") in out.stdout


def test_a_failed_fetch_is_not_retried_within_its_time_to_live(tmp_path: Path) -> None:
    script = r"""
vhost_vsock_version() { :; }
install_vhost_vsock_from_unstable() { echo vhost >>"$CALLS"; return 1; }
runsc_date() { :; }
runsc_suite() { echo bookworm-backports; }
install_runsc_from_debian() { echo "runsc $1" >>"$CALLS"; return 1; }
mkdir -p "$PREFIX"
step_vhost_vsock; step_runsc
step_vhost_vsock; step_runsc
"""
    out = run_sourced(tmp_path, script)
    assert out.returncode == 0, out.stderr
    assert calls(tmp_path) == ["vhost", "runsc bookworm-backports"]
    assert "rm " in out.stdout and "vhost-device-vsock.unavailable to retry now" in out.stdout
    # a day later both are tried again; a success clears the record, a failure renews it
    for name in ("vhost-device-vsock", "runsc"):
        os.utime(tmp_path / "prefix" / f"{name}.unavailable", (0, 0))
    later = script.replace("return 1; }\nrunsc_date", "return 0; }\nrunsc_date").rsplit("step_vhost_vsock", 1)[0]
    out = run_sourced(tmp_path, later)
    assert out.returncode == 0, out.stderr
    assert calls(tmp_path)[2:] == ["vhost", "runsc bookworm-backports"]
    assert not (tmp_path / "prefix" / "vhost-device-vsock.unavailable").exists()
    assert (tmp_path / "prefix" / "runsc.unavailable").stat().st_mtime > 0


def test_a_venv_without_pip_is_made_again(tmp_path: Path) -> None:
    # `python -m venv` cut short before ensurepip leaves a venv without pip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    out = run_sourced(tmp_path, f'PY="{sys.executable}"\nvenv_usable && echo usable || echo unusable')
    assert out.stdout.strip() == "unusable", out.stderr
    have_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False)
    if have_pip.returncode == 0:  # the test's own interpreter (the project venv) has pip
        out = run_sourced(tmp_path, f'PY="{sys.executable}"\nVENV="{Path(sys.prefix)}"\n'
                                    "venv_usable && echo usable || echo unusable")
        assert out.stdout.strip() == "usable", out.stderr


def test_a_failed_fetch_is_tried_again_once_the_fetching_scripts_changed(tmp_path: Path) -> None:
    # A marker written before setup.sh or debian_mirror.py was fixed kept the fix from being tried for a day.
    script = r"""
vhost_vsock_version() { :; }
install_vhost_vsock_from_unstable() { echo vhost >>"$CALLS"; return 1; }
mkdir -p "$PREFIX"
step_vhost_vsock
"""
    assert run_sourced(tmp_path, script).returncode == 0
    marker = tmp_path / "prefix" / "vhost-device-vsock.unavailable"
    newest_script = max(SETUP.stat().st_mtime, (SETUP.parent / "debian_mirror.py").stat().st_mtime)
    os.utime(marker, (newest_script - 1, newest_script - 1))  # written before the scripts' last change
    out = run_sourced(tmp_path, script)
    assert out.returncode == 0, out.stderr
    assert calls(tmp_path) == ["vhost", "vhost"]


# apt-get as against a mirror that stopped syncing one suite: its Release file is past its Valid-Until,
# which apt refuses unless told not to check the dates.
EXPIRED = ("E: Release file for http://mirror.invalid/debian/dists/unstable/InRelease is expired "
           "(invalid since 24d 8h 56min 4s). Updates for this repository will not be applied.")
STALE_SUITE_STUBS = r"""
apt-get() {
    echo "apt-get $*" >>"$CALLS"
    case " $* " in
        *" update "*)
            if [[ " $* " != *" Acquire::Check-Valid-Until=false "* ]]; then
                echo "${UPDATE_ERROR:-EXPIRED}" >&2
                return 100
            fi ;;
        *" download "*) : >"${@: -1}_1.0_amd64.deb" ;;
    esac
}
dpkg-deb() { mkdir -p "$3"; }
dpkg() { echo amd64; }
""".replace("EXPIRED", EXPIRED)


def fake_mirror_chooser(tmp_path: Path) -> str:
    """A $PY that stands in for scripts/debian_mirror.py: writes a source list, says nothing."""
    chooser = tmp_path / "py"
    chooser.write_text('#!/bin/sh\necho "Types: deb" >"$3"\n')
    chooser.chmod(0o755)
    return f'PY="{chooser}"\n'


def test_a_fetch_from_a_suite_past_its_valid_until_goes_on_without_date_checks(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, fake_mirror_chooser(tmp_path) + STALE_SUITE_STUBS
                      + 'mkdir -p "$PREFIX"\nfetch_debian_package unstable containerd "$STATE/stage"')
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "containerd_1.0_amd64.deb"
    assert "out of date; fetching from it without date checks" in out.stdout + out.stderr
    updates = [c for c in calls(tmp_path) if " update" in c]
    download = [c for c in calls(tmp_path) if " download " in c]
    assert len(updates) == 2 and "Check-Valid-Until" not in updates[0]
    # the signature is still checked: only the date checks are off, for this suite's fetch alone
    assert all("Acquire::Check-Valid-Until=false" in c and "Acquire::Check-Date=false" in c
               for c in (updates[1], *download))
    assert not any("AllowInsecureRepositories" in c or "Trusted" in c for c in calls(tmp_path))


def test_a_fetch_whose_update_fails_otherwise_is_not_tried_without_date_checks(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, fake_mirror_chooser(tmp_path) + STALE_SUITE_STUBS
                      + 'UPDATE_ERROR="E: Failed to fetch http://mirror.invalid/x"\nmkdir -p "$PREFIX"\n'
                      + 'fetch_debian_package unstable containerd "$STATE/stage"')
    assert out.returncode != 0 and "could not download containerd" in out.stderr
    assert "Failed to fetch" in out.stderr  # apt's own reason is shown
    assert [c for c in calls(tmp_path) if " update" in c] and not any("Check-Valid-Until" in c for c in calls(tmp_path))
    assert not (tmp_path / "stage").exists()


def test_the_machines_apt_update_goes_on_with_its_lists_when_a_suite_is_refused_for_its_dates(tmp_path: Path) -> None:
    # Setup stopped at "apt-get update failed"; the machine's own sources keep their date checks (they guard
    # what apt installs next), so the refused suite is reported and apt goes on with the lists it has.
    out = run_sourced(tmp_path, STALE_SUITE_STUBS + "apt_update && echo updated")
    assert out.returncode == 0 and out.stdout.strip().endswith("updated"), out.stdout + out.stderr
    assert "refused a Release file of this machine's sources for its dates" in out.stdout
    updates = calls(tmp_path)
    assert len(updates) == 1 and "Check-Valid-Until" not in updates[0] and "Check-Date" not in updates[0]


def test_the_machines_apt_update_still_fails_on_other_errors_beside_a_stale_suite(tmp_path: Path) -> None:
    out = run_sourced(tmp_path, STALE_SUITE_STUBS.replace(
        'echo "${UPDATE_ERROR:-', 'echo "E: Failed to fetch http://mirror.invalid/x 404" >&2; echo "${UPDATE_ERROR:-')
        + "apt_update && echo updated")
    assert out.returncode != 0 and "updated" not in out.stdout, out.stdout
    assert "404" in out.stderr
