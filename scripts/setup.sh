#!/usr/bin/env bash
# kuasar-py environment setup: `bash scripts/setup.sh` (the README's commands; `make setup` runs it too).
#
# Idempotent and cheap on rerun: every step first checks whether its result is already in place.
#   0. Python >= 3.11 (Debian's python3, installed when the machine has none);
#   1. distro packages (make, runc, CNI plugins, static busybox, QEMU, ...), installed only when missing;
#   2. containerd >= 2.1 in a project-local prefix (${KUASAR_PREFIX:-<repo>/.prefix}/bin), taken from
#      Debian's `unstable` suite of the mirror this machine is already configured with, through a
#      private apt state so the machine's own apt configuration is never modified;
#      vhost-device-vsock (the micro-VMs' vsock backend) the same way, from unstable (2c); criu built
#      from unstable's source (2e);
#   3. a Python venv (${VENV:-<repo>/.venv}) with the project installed editable with its dev extras;
#   4. generated protobuf/gRPC stubs (scripts/gen_protos.py skips when up to date).
# Sourced (by tests) it only defines its functions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${KUASAR_PREFIX:-$ROOT/.prefix}"
VENV="${VENV:-$ROOT/.venv}"
MIN_CONTAINERD="2.1"
# Root's sbin directories, which `su` without `-` leaves out of PATH: dpkg refuses to run without
# ldconfig and start-stop-daemon on it.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# apt, for the distro packages (1) and for Python itself when the machine has none (0)
# ---------------------------------------------------------------------------------------------
# How long apt waits for another apt or dpkg run to end: on a fresh cloud VM, apt-daily and
# unattended-upgrades hold the locks for minutes after the first boot.
APT_LOCK_TIMEOUT_S=900
APT_LOCK_POLL_S=5                       # between two tries of `apt-get update` while its lock is held
DPKG_UPDATES_DIR=/var/lib/dpkg/updates  # dpkg's journal: files left there mean an interrupted run
APT_UPDATED=""                          # set once this run refreshed the package lists

# Never a prompt (setup may run with no terminal): a changed config file keeps the machine's version.
DPKG_CONFFILE_OPTS=(--force-confdef --force-confold)

apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT_S" \
        -o "Dpkg::Options::=${DPKG_CONFFILE_OPTS[0]}" -o "Dpkg::Options::=${DPKG_CONFFILE_OPTS[1]}" "$@"
}

# A mirror may stop syncing one suite while it serves the rest: then that suite's Release file is past
# its Valid-Until, and apt refuses it ("is expired"), as it refuses one dated ahead of a clock that is
# behind ("is not valid yet"). A suite setup fetches one package from privately (fetch_debian_package:
# unstable for containerd, a backports suite for runsc) is then tried again without those two date
# checks, saying so: its Release file's signature is still checked, only its freshness is not (a stale
# suite is what there is). The machine's own sources keep their date checks (they protect what apt
# installs next against a replayed old Release file): a suite of theirs refused for its dates alone is
# only reported, and apt goes on with the lists it has.
APT_DATE_CHECKS_OFF=(-o "Acquire::Check-Valid-Until=false" -o "Acquire::Check-Date=false")
APT_DATE_REFUSAL='is (expired|not valid yet)'

# True if apt's error output ($1) names a Release file refused for its dates.
release_dates_refused() { grep -q -E "$APT_DATE_REFUSAL" <<<"$1"; }

# True if every error in apt's output ($1) is a Release file refused for its dates.
only_release_dates_refused() {
    local others
    others="$(grep -v -E "$APT_DATE_REFUSAL" <<<"$1" || true)"
    release_dates_refused "$1" && ! grep -q '^E:' <<<"$others"
}

# apt-get update takes the lists' lock without waiting (DPkg::Lock::Timeout is for dpkg's lock):
# tried again while another apt run holds it, for up to the same time. Once per run.
apt_update() {
    [[ -z "$APT_UPDATED" ]] || return 0
    local deadline=$((SECONDS + APT_LOCK_TIMEOUT_S)) err said=""
    until err="$(LC_ALL=C apt_get -qq update 2>&1 >/dev/null)"; do
        if only_release_dates_refused "$err"; then
            log "WARNING: apt refused a Release file of this machine's sources for its dates; going on with" \
                "the package lists it has: $(grep -m1 -E "$APT_DATE_REFUSAL" <<<"$err")"
            break
        fi
        if [[ "$err" != *"Could not get lock"* ]] || ((SECONDS >= deadline)); then
            printf '%s\n' "$err" >&2
            return 1
        fi
        [[ -n "$said" ]] || log "waiting for another apt run to end (apt-get update)"
        said=1
        sleep "$APT_LOCK_POLL_S"
    done
    [[ -z "$err" ]] || printf '%s\n' "$err" >&2
    APT_UPDATED=1
}

# True after a dpkg run was cut short (a power cut, a killed apt): apt-get refuses to install
# anything until `dpkg --configure -a` has finished it.
dpkg_interrupted() {
    [[ -n "$(dpkg --audit 2>/dev/null)" ]] || [[ -n "$(ls -A "$DPKG_UPDATES_DIR" 2>/dev/null)" ]]
}

# The given packages that are not installed. A held package ("hi") is installed.
missing_packages() {
    local pkg status
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
        [[ "${status:1:1}" == i ]] || echo "$pkg"
    done
}

# install_packages PACKAGE...: install those of the packages that are missing, then check them.
install_packages() {
    local missing still
    mapfile -t missing < <(missing_packages "$@")
    if ((${#missing[@]} == 0)); then
        log "distro packages present"
        return 0
    fi
    log "installing distro packages: ${missing[*]}"
    apt_update || die "apt-get update failed"
    # A dpkg run that was cut short is finished only once apt, having waited for the lock, refused
    # because of it: an audit taken while unattended-upgrades runs would see its packages half-done.
    if ! apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        dpkg_interrupted || die "apt-get install failed"
        log "finishing an interrupted dpkg run (dpkg --configure -a), then installing again"
        DEBIAN_FRONTEND=noninteractive dpkg "${DPKG_CONFFILE_OPTS[@]}" --configure -a >/dev/null \
            || die "dpkg --configure -a failed"
        apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed"
    fi
    mapfile -t still < <(missing_packages "$@")
    ((${#still[@]} == 0)) || die "packages still missing after apt-get install: ${still[*]}"
}

# ---------------------------------------------------------------------------------------------
# 0. Python >= 3.11
# ---------------------------------------------------------------------------------------------
# The distribution's python3 comes first: Debian builds it with PGO and LTO and links libpython
# statically, while interpreters built from source (pyenv's default) have neither. Measured here, the
# daemons then spend ~13% less CPU per Sandbox API call (their memory is about the same).
find_python() {
    local cand
    for cand in "${PYTHON:-}" /usr/bin/python3 python3 python3.13 python3.12 python3.11; do
        [[ -n "$cand" ]] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

step_python() {
    if ! PY="$(find_python)"; then
        # a minimal image (a container's, a debootstrap) has no python3 at all: Debian's is >= 3.11
        install_packages python3 python3-venv
        PY="$(find_python)" \
            || die "Python >= 3.11 is required (set PYTHON=/path/to/python3.11+); found: $(python3 --version 2>&1 || echo none)"
    fi
}

# ---------------------------------------------------------------------------------------------
# 1. Distro packages
# ---------------------------------------------------------------------------------------------
step_packages() {
    # make: the README's commands and .ci/run use it, and minimal and cloud images lack it.
    local packages=(make runc containernetworking-plugins busybox-static iproute2 iptables util-linux mount kmod
                    procps ca-certificates debian-archive-keyring)
    # QEMU (TCG micro-VMs of vm-agent / vmm-sandboxer); vhost-device-vsock comes from unstable (2c).
    packages+=(qemu-system-x86)
    # zstd: the guest image build unpacks Debian 13's zstd-compressed kernel (vmlinuz) with it.
    packages+=(zstd)
    # gpg: the tests sign a local archive to check the apt source setup writes (test_debian_mirror); the
    # key is made by gpg-agent, which Debian 13's gpg only recommends.
    packages+=(gpg gpg-agent)
    # A C compiler and musl for kuasar-pause, the few-KB program every pod process becomes (2d): linked
    # statically against musl it is 34 KB and keeps ~12 KB of private memory per pod (glibc's static
    # startup: 690 KB and ~44 KB per pod).
    packages+=(gcc libc6-dev musl-tools)
    # The venv module of Debian's python3 needs python3-venv (ensurepip); other interpreters ship it.
    if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        packages+=(python3-venv)
    fi
    # PyInstaller (`make binaries`) bundles the shared libpython, which Debian's python3 does not use.
    if [[ "$(readlink -f "$PY")" == /usr/bin/python3* ]]; then
        packages+=(libpython3-dev)
    fi
    install_packages "${packages[@]}"
    [[ -x /bin/busybox ]] || die "/bin/busybox missing (package busybox-static)"
    /bin/busybox --list >/dev/null 2>&1 || die "/bin/busybox does not run"
}

# ---------------------------------------------------------------------------------------------
# 2. containerd >= 2.1 in $PREFIX/bin
# ---------------------------------------------------------------------------------------------
# Prints the bare version of a containerd binary ("2.1.9"), or nothing.
containerd_version() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 0
    # "containerd github.com/containerd/containerd/v2 2.1.9+unknown <revision>"
    awk '{print $3}' <<<"$out" | sed -e 's/^v//' -e 's/[+~-].*$//'
}
version_ok() { [[ -n "$1" ]] && dpkg --compare-versions "$1" ge "$MIN_CONTAINERD"; }
# What we use of containerd's package besides containerd: a setup cut short while copying the
# package's binaries leaves a containerd without them.
containerd_tools_present() { [[ -x "$PREFIX/bin/ctr" && -x "$PREFIX/bin/containerd-shim-runc-v2" ]]; }

# A tool whose fetch failed is not tried again for this long: every try downloads a suite's package
# index (tens of MB for unstable), and a rerun must stay quick. Deleting the marker retries at once.
FETCH_RETRY_AFTER_S=$((24 * 3600))

# try_fetch NAME COMMAND...: run COMMAND (it installs NAME into $PREFIX/bin) unless it failed less
# than FETCH_RETRY_AFTER_S ago; a failure is recorded in $PREFIX/NAME.unavailable.
try_fetch() {
    local name="$1" marker="$PREFIX/$1.unavailable" age
    shift
    # A marker older than the scripts that fetch is stale: a fix to them is tried at once.
    if [[ -f "$marker" && ! "$ROOT/scripts/setup.sh" -nt "$marker" && ! "$ROOT/scripts/debian_mirror.py" -nt "$marker" ]]; then
        age=$(($(date +%s) - $(stat -c %Y "$marker")))
        if ((age >= 0 && age < FETCH_RETRY_AFTER_S)); then
            log "WARNING: $name not installed: fetching it failed $((age / 3600)) h ago, next try" \
                "$((FETCH_RETRY_AFTER_S / 3600)) h after that (rm $marker to retry now)"
            return 1
        fi
    fi
    if "$@"; then
        rm -f "$marker"
        return 0
    fi
    date -u '+%Y-%m-%dT%H:%M:%SZ' >"$marker"
    return 1
}

# private_apt_options ARRAY APTDIR: set ARRAY to the options of an apt whose whole state (sources in
# APTDIR/etc/private.sources, lists, status, cache) lives in APTDIR; the status file is made empty.
private_apt_options() {
    local -n opts="$1"
    local aptdir="$2"
    : >"$aptdir/etc/status"
    opts=(
        -o "Dir::Etc::SourceList=$aptdir/etc/private.sources"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "Dir::State::Lists=$aptdir/lists"
        -o "Dir::State::status=$aptdir/etc/status"
        -o "Dir::Cache=$aptdir/cache"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
    )
}

# private_apt_update ARRAY SUITE: `apt-get update` with the apt options in ARRAY (private_apt_options);
# a SUITE apt refuses only for its Release file's dates is fetched again without the two date checks,
# which are then added to ARRAY for what follows, with a warning. Fails when the lists could not be had.
private_apt_update() {
    local -n update_opts="$1"
    local suite="$2" err updated=1
    err="$(LC_ALL=C apt-get -qq "${update_opts[@]}" update 2>&1 >/dev/null)" || updated=""
    if [[ -z "$updated" ]] && release_dates_refused "$err"; then
        log "WARNING: the mirror's $suite is out of date; fetching from it without date checks:" \
            "$(grep -m1 -E "$APT_DATE_REFUSAL" <<<"$err")" >&2
        update_opts+=("${APT_DATE_CHECKS_OFF[@]}")
        updated=1
        err="$(LC_ALL=C apt-get -qq "${update_opts[@]}" update 2>&1 >/dev/null)" || updated=""
    fi
    [[ -z "$err" ]] || printf '%s\n' "$err" >&2
    [[ -n "$updated" ]]
}

# fetch_debian_package SUITE PACKAGE STAGE: download PACKAGE from the machine's own Debian mirror's SUITE
# with a private apt state (the machine's apt configuration is never touched) and unpack it into STAGE.
# Prints the .deb's file name; returns non-zero (after saying why) when it cannot. The index and the
# .deb are not kept: only what the caller installs from STAGE is.
fetch_debian_package() {
    local suite="$1" package="$2" stage="$3" aptdir="$PREFIX/apt-$2"
    log "fetching $package from Debian $suite (private apt state in $aptdir)" >&2
    rm -rf "$aptdir" "$stage"
    mkdir -p "$aptdir/etc" "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/download"
    # the machine's Debian archive, its key and options, for SUITE (see scripts/debian_mirror.py)
    if ! "$PY" "$ROOT/scripts/debian_mirror.py" "$suite" "$aptdir/etc/private.sources" >&2; then
        rm -rf "$aptdir"
        return 1
    fi
    local apt_opts
    private_apt_options apt_opts "$aptdir"
    apt_opts+=(
        -o "APT::Architectures::=$(dpkg --print-architecture)"
        -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
    )
    local deb=""
    if private_apt_update apt_opts "$suite" \
        && (cd "$aptdir/download" && apt-get -qq "${apt_opts[@]}" download "$package" >/dev/null); then
        deb="$(ls "$aptdir/download/${package}"_*.deb 2>/dev/null | head -n1)"
    fi
    if [[ -z "$deb" ]] || ! dpkg-deb -x "$deb" "$stage"; then
        rm -rf "$aptdir" "$stage"
        log "could not download $package from Debian $suite" >&2
        return 1
    fi
    basename "$deb"
    rm -rf "$aptdir"
}

install_containerd_from_unstable() {
    local stage="$PREFIX/.containerd-stage" deb
    deb="$(fetch_debian_package unstable containerd "$stage")" || die "cannot fetch containerd from Debian unstable"
    local new_version
    new_version="$(containerd_version "$stage/usr/bin/containerd")"
    version_ok "$new_version" \
        || die "containerd from unstable is '${new_version:-unrunnable}' (need >= $MIN_CONTAINERD, runnable on this glibc)"
    "$stage/usr/bin/ctr" --version >/dev/null || die "ctr from the package does not run"
    "$stage/usr/bin/containerd-shim-runc-v2" -v >/dev/null || die "containerd-shim-runc-v2 does not run"
    mkdir -p "$PREFIX/bin"
    local f
    for f in "$stage"/usr/bin/*; do
        install -m 0755 "$f" "$PREFIX/bin/.$(basename "$f").new"
        mv -f "$PREFIX/bin/.$(basename "$f").new" "$PREFIX/bin/$(basename "$f")"
    done
    # (the mirror's address is deliberately not recorded: it is the machine's, not the project's)
    printf 'containerd %s\npackage %s\nsource debian unstable\n' \
        "$new_version" "$deb" >"$PREFIX/containerd.version"
    rm -rf "$stage"
}

# Sets HAVE_CONTAINERD to the version in $PREFIX/bin.
step_containerd() {
    mkdir -p "$PREFIX/bin"
    HAVE_CONTAINERD="$(containerd_version "$PREFIX/bin/containerd")"
    if version_ok "$HAVE_CONTAINERD" && containerd_tools_present; then
        log "containerd $HAVE_CONTAINERD present in $PREFIX/bin"
        return 0
    fi
    local sys_containerd sys_version="" b
    sys_containerd="$(command -v containerd 2>/dev/null || true)"
    [[ -n "$sys_containerd" && "$sys_containerd" != "$PREFIX/bin/containerd" ]] \
        && sys_version="$(containerd_version "$sys_containerd")"
    if version_ok "$sys_version" && command -v ctr >/dev/null && command -v containerd-shim-runc-v2 >/dev/null; then
        log "using the system containerd $sys_version ($sys_containerd)"
        for b in containerd ctr containerd-shim-runc-v2; do
            ln -sfn "$(command -v "$b")" "$PREFIX/bin/$b"
        done
        printf 'containerd %s\nsource system %s\n' "$sys_version" "$sys_containerd" >"$PREFIX/containerd.version"
    else
        install_containerd_from_unstable
    fi
    HAVE_CONTAINERD="$(containerd_version "$PREFIX/bin/containerd")"
    version_ok "$HAVE_CONTAINERD" && containerd_tools_present \
        || die "containerd in $PREFIX/bin is '${HAVE_CONTAINERD:-missing}' (need >= $MIN_CONTAINERD, with ctr and containerd-shim-runc-v2)"
    log "containerd $HAVE_CONTAINERD installed in $PREFIX/bin"
}

# ---------------------------------------------------------------------------------------------
# 2b. gVisor's runsc in $PREFIX/bin (quark-sandboxer's runsc backend and its tests)
# ---------------------------------------------------------------------------------------------
# Debian 12's own runsc (20221219) has no systrap platform, so on bookworm it comes from
# bookworm-backports; on 13 and later the release's main suite is recent enough. Same private apt
# state as for containerd: the machine's apt configuration is never touched. Not fatal: without
# runsc the gVisor tests skip and say why.
MIN_RUNSC_DATE=20230101   # systrap (the platform that works without hardware virtualisation)

# Prints the release date of a runsc binary ("20240729"), or nothing.
runsc_date() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 0
    # "runsc version release-20240729.0" (Debian: "runsc version 0.0~20240729.0-4~bpo12+2")
    grep -oE '(release-|0\.0~)[0-9]{8}' <<<"$out" | head -n1 | grep -oE '[0-9]{8}$' || true
}
runsc_ok() { [[ -n "$1" && "$1" -ge "$MIN_RUNSC_DATE" ]]; }

runsc_suite() {
    local id="" version_id="" codename=""
    # shellcheck disable=SC1091
    . /etc/os-release 2>/dev/null && id="${ID:-}" version_id="${VERSION_ID:-}" codename="${VERSION_CODENAME:-}"
    [[ "$id" == debian && -n "$codename" ]] || return 1
    if [[ "$version_id" == 12 ]]; then echo "$codename-backports"; else echo "$codename"; fi
}

install_runsc_from_debian() {
    local suite="$1" stage="$PREFIX/.runsc-stage" deb date
    deb="$(fetch_debian_package "$suite" runsc "$stage")" || { log "WARNING: runsc not installed"; return 1; }
    date="$(runsc_date "$stage/usr/bin/runsc")"
    if ! runsc_ok "$date"; then
        rm -rf "$stage"
        log "WARNING: runsc from Debian $suite is '${date:-unrunnable}' (need a build from $MIN_RUNSC_DATE on)"
        return 1
    fi
    install -m 0755 "$stage/usr/bin/runsc" "$PREFIX/bin/.runsc.new"
    mv -f "$PREFIX/bin/.runsc.new" "$PREFIX/bin/runsc"
    printf 'runsc %s\npackage %s\nsource debian %s\n' "$date" "$deb" "$suite" >"$PREFIX/runsc.version"
    rm -rf "$stage"
}

step_runsc() {
    local have_runsc sys_runsc sys_runsc_date="" suite
    have_runsc="$(runsc_date "$PREFIX/bin/runsc")"
    if runsc_ok "$have_runsc"; then
        log "runsc $have_runsc present in $PREFIX/bin"
        return 0
    fi
    sys_runsc="$(command -v runsc 2>/dev/null || true)"
    [[ -n "$sys_runsc" && "$sys_runsc" != "$PREFIX/bin/runsc" ]] && sys_runsc_date="$(runsc_date "$sys_runsc")"
    if runsc_ok "$sys_runsc_date"; then
        log "using the system runsc $sys_runsc_date ($sys_runsc)"
        ln -sfn "$sys_runsc" "$PREFIX/bin/runsc"
        printf 'runsc %s\nsource system %s\n' "$sys_runsc_date" "$sys_runsc" >"$PREFIX/runsc.version"
    elif suite="$(runsc_suite)"; then
        try_fetch runsc install_runsc_from_debian "$suite" \
            && log "runsc $(runsc_date "$PREFIX/bin/runsc") installed in $PREFIX/bin"
    else
        log "WARNING: not a Debian release this script knows; runsc not installed (gVisor tests will skip)"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# 2c. vhost-device-vsock in $PREFIX/bin (the vsock backend of the QEMU micro-VMs)
# ---------------------------------------------------------------------------------------------
# Debian 12 has no package; unstable's (0.3.0) runs on glibc 2.36. Same private apt state as for
# containerd. Not fatal: without it the VM tests skip and say why.
vhost_vsock_version() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 0
    # "vhost-device-vsock 0.3.0"
    awk 'NR == 1 {print $2}' <<<"$out"
}

install_vhost_vsock_from_unstable() {
    local stage="$PREFIX/.vhost-stage" deb version
    deb="$(fetch_debian_package unstable vhost-device-vsock "$stage")" \
        || { log "WARNING: vhost-device-vsock not installed"; return 1; }
    version="$(vhost_vsock_version "$stage/usr/bin/vhost-device-vsock")"
    if [[ -z "$version" ]]; then
        rm -rf "$stage"
        log "WARNING: vhost-device-vsock from Debian unstable does not run on this system"
        return 1
    fi
    install -m 0755 "$stage/usr/bin/vhost-device-vsock" "$PREFIX/bin/.vhost-device-vsock.new"
    mv -f "$PREFIX/bin/.vhost-device-vsock.new" "$PREFIX/bin/vhost-device-vsock"
    printf 'vhost-device-vsock %s\npackage %s\nsource debian unstable\n' "$version" "$deb" \
        >"$PREFIX/vhost-device-vsock.version"
    rm -rf "$stage"
}

step_vhost_vsock() {
    local have_vhost
    have_vhost="$(vhost_vsock_version "$PREFIX/bin/vhost-device-vsock")"
    if [[ -n "$have_vhost" ]]; then
        log "vhost-device-vsock $have_vhost present in $PREFIX/bin"
    elif try_fetch vhost-device-vsock install_vhost_vsock_from_unstable; then
        log "vhost-device-vsock $(vhost_vsock_version "$PREFIX/bin/vhost-device-vsock") installed in $PREFIX/bin"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# 2e. criu in $PREFIX/bin (runc's checkpoints: CRI CheckpointContainer of runc-sandboxer's containers)
# ---------------------------------------------------------------------------------------------
# Debian 12's criu (3.17) fails `criu check` on 6.x kernels ("Unexpected rt vDSO area bounds"), and the
# binaries of trixie and unstable need a newer glibc; so criu is built from unstable's source (~30 s),
# with its build dependencies from the machine's own suite. Not fatal: without it Checkpoint says that
# criu is missing and its tests skip.
MIN_CRIU_VERSION=4.0   # Debian 12's 3.17 fails `criu check` on this kernel; 4.2.1 passes
CRIU_BUILD_PACKAGES=(libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
                     libnl-3-dev libnet1-dev libcap-dev libbsd-dev pkg-config uuid-dev)

# Prints a criu binary's version ("4.2.1"), or nothing.
criu_version() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 0
    # "Version: 4.2.1"
    awk '/^Version:/ {print $2}' <<<"$out"
}
criu_ok() { [[ -n "$1" ]] && dpkg --compare-versions "$1" ge "$MIN_CRIU_VERSION"; }

# fetch_debian_source SUITE PACKAGE DIR: download PACKAGE's upstream tarball (checked against the .dsc
# by apt) from the machine's Debian mirror's SUITE into DIR; prints its path.
fetch_debian_source() {
    local suite="$1" package="$2" dir="$3" aptdir="$PREFIX/apt-src-$2" tarball
    rm -rf "$aptdir" "$dir"
    mkdir -p "$aptdir/etc" "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$dir"
    "$PY" "$ROOT/scripts/debian_mirror.py" "$suite" "$aptdir/etc/private.sources" >&2 || return 1
    sed -i 's/^Types: deb$/Types: deb-src/' "$aptdir/etc/private.sources"
    local apt_opts
    private_apt_options apt_opts "$aptdir"
    private_apt_update apt_opts "$suite" || { rm -rf "$aptdir"; return 1; }
    # Only the upstream tarball is used: a mirror that lacks the Debian packaging tarball (seen) still
    # serves it, so apt's failure over the other file is not the end.
    (cd "$dir" && LC_ALL=C apt-get -qq "${apt_opts[@]}" source --download-only "$package" >/dev/null 2>&1) || true
    rm -rf "$aptdir"
    tarball="$(ls "$dir/${package}"_*.orig.tar.* 2>/dev/null | head -n1)"
    [[ -n "$tarball" ]] || { log "could not download the source of $package from Debian $suite" >&2; return 1; }
    echo "$tarball"
}

install_criu_from_source() {
    local dir="$PREFIX/.criu-src" tarball src version
    install_packages "${CRIU_BUILD_PACKAGES[@]}"
    tarball="$(fetch_debian_source unstable criu "$dir")" || return 1
    log "building criu from $(basename "$tarball")"
    tar -xf "$tarball" -C "$dir"
    src="$(find "$dir" -mindepth 1 -maxdepth 1 -type d -name 'criu-*' | head -n1)"
    # Where /run is not a tmpfs, CRIU (4.2.1) gives up its kernel-facts cache but removes the cache file
    # instead of its temporary file: /run/criu.kdat.tmp stayed after every checkpoint, and since CRIU
    # creates it O_EXCL, no later run cleaned it up. Remove the right file.
    [[ -z "$src" ]] || sed -i '/^\tunl:$/{n;s/unlink(kdat_file);/unlink(kdat_file_tmp);/}' "$src/criu/kerndat.c"
    # WERROR=0: CRIU builds with -Werror, and a newer compiler's new warnings (Debian 13's) must not fail it.
    if [[ -z "$src" ]] || ! make -C "$src" -j"$(nproc)" WERROR=0 criu >"$dir.log" 2>&1; then
        log "WARNING: building criu failed (last lines of $dir.log):"
        tail -n 5 "$dir.log" >&2 || true
        rm -rf "$dir"
        return 1
    fi
    version="$(criu_version "$src/criu/criu")"
    if ! criu_ok "$version" || ! "$src/criu/criu" check >/dev/null 2>&1; then
        log "WARNING: the criu built ('${version:-unrunnable}') does not pass \`criu check\` on this kernel"
        rm -rf "$dir"
        return 1
    fi
    install -m 0755 "$src/criu/criu" "$PREFIX/bin/.criu.new"
    mv -f "$PREFIX/bin/.criu.new" "$PREFIX/bin/criu"
    printf 'criu %s\nsource debian unstable %s\n' "$version" "$(basename "$tarball")" >"$PREFIX/criu.version"
    rm -rf "$dir" "$dir.log"
}

step_criu() {
    local have_criu
    have_criu="$(criu_version "$PREFIX/bin/criu")"
    if criu_ok "$have_criu"; then
        log "criu $have_criu present in $PREFIX/bin"
    elif try_fetch criu install_criu_from_source; then
        log "criu $(criu_version "$PREFIX/bin/criu") installed in $PREFIX/bin"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# 2d. kuasar-pause in $PREFIX/bin (the pod process's program once its namespaces are set up)
# ---------------------------------------------------------------------------------------------
step_pause() {
    local src="$ROOT/common/kuasar/common/native/kuasar-pause.c" bin="$PREFIX/bin/kuasar-pause"
    # (this script holds the build's flags: a change to it rebuilds)
    if [[ ! -x "$bin" || "$src" -nt "$bin" || "${BASH_SOURCE[0]}" -nt "$bin" ]]; then
        log "building kuasar-pause"
        musl-gcc -Os -static -s -Wall -Werror -o "$bin.new" "$src"
        mv -f "$bin.new" "$bin"
    else
        log "kuasar-pause present in $PREFIX/bin"
    fi
}

# ---------------------------------------------------------------------------------------------
# 3. Python venv with the project installed editable
# ---------------------------------------------------------------------------------------------
# Component folders each hold one part of the `kuasar` namespace package (no kuasar/__init__.py).
COMPONENTS=(common runc-sandboxer wasm-sandboxer vmm-sandboxer quark-sandboxer vm-agent ctl)
STAMP="$VENV/.kuasar-setup-stamp"

# True when the venv imports kuasar.common and every component's `kuasar/<sub>` folder is what the
# venv resolves `kuasar.<sub>` to (run from / so the repo's cwd does not count).
venv_imports_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    (cd / && "$VENV/bin/python" - "$ROOT" "${COMPONENTS[@]}" <<'PYEOF'
import importlib.util, os, sys
root, comps = sys.argv[1], sys.argv[2:]
import kuasar.common  # noqa: F401
bad = []
for comp in comps:
    base = os.path.join(root, comp, "kuasar")
    if not os.path.isdir(base):
        continue
    for sub in sorted(os.listdir(base)):
        folder = os.path.join(base, sub)
        if not os.path.isdir(folder) or not sub.isidentifier():
            continue
        spec = importlib.util.find_spec(f"kuasar.{sub}")
        where = {os.path.realpath(p) for p in (spec.submodule_search_locations or [])} if spec else set()
        if os.path.realpath(folder) not in where:
            bad.append(f"kuasar.{sub} -> {sorted(where)} (want {folder})")
if bad:
    sys.exit("wrong kuasar namespace: " + "; ".join(bad))
PYEOF
    ) >/dev/null 2>&1
}

# Last-resort install, used only when setuptools cannot build the project editable: the dependencies
# from pyproject.toml, a .pth that puts every component folder on sys.path (PEP 420 then merges
# their `kuasar/` portions into one namespace package), and wrappers for [project.scripts].
install_without_build() {
    local site reqs
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    reqs="$("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project.get("dependencies", []) + project.get("optional-dependencies", {}).get("dev", [])))
PYEOF
)"
    "$VENV/bin/python" -m pip uninstall -q -y kuasar-py >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $reqs >>"$VENV/.kuasar-pip.log" 2>&1 \
        || { tail -n 20 "$VENV/.kuasar-pip.log" >&2; die "pip install of the dependencies failed"; }
    for c in "${COMPONENTS[@]}"; do
        [[ -d "$ROOT/$c" ]] && echo "$ROOT/$c"
    done >"$site/kuasar-components.pth"
    "$VENV/bin/python" - "$ROOT/pyproject.toml" "$VENV/bin" <<'PYEOF'
import os, sys, tomllib
scripts = tomllib.load(open(sys.argv[1], "rb"))["project"].get("scripts", {})
for name, target in scripts.items():
    module, func = target.split(":")
    path = os.path.join(sys.argv[2], name)
    with open(path, "w") as f:
        f.write(f"#!{sys.argv[2]}/python\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    os.chmod(path, 0o755)
PYEOF
}

# True when $VENV is a venv of $PY with a working pip (one cut short after `python -m venv` has none).
venv_usable() {
    [[ -x "$VENV/bin/python" ]] && [[ "$(readlink -f "$VENV/bin/python")" == "$(readlink -f "$PY")" ]] \
        && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

step_venv() {
    local want_stamp site piplog
    want_stamp="$(sha256sum <"$ROOT/pyproject.toml" | cut -d' ' -f1) $(readlink -f "$PY")"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] && venv_imports_ok; then
        log "venv up to date ($VENV)"
        return 0
    fi
    if ! venv_usable; then
        log "creating venv $VENV with $PY ($("$PY" --version 2>&1))"
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
    fi
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    rm -f "$site/kuasar-components.pth"
    log "pip install -e '.[dev]' (this takes a while the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null 2>&1 \
        || log "WARNING: could not upgrade pip/setuptools/wheel in the venv"
    # Editable installs of a namespace package spread over several folders are fragile:
    #  * setuptools' `packages.find` with several `where` folders maps the top-level `kuasar` to the
    #    LAST folder only, so unless pyproject maps each `kuasar.<component>` in [tool.setuptools.
    #    package-dir], the build itself fails ("package directory 'vm-agent/kuasar/common' does not
    #    exist");
    #  * the default ("lenient") editable mode installs an import hook mapping each package found at
    #    install time; a component missing from that mapping is silently invisible.
    # So after pip we check that every `<component>/kuasar/<sub>` folder is what `kuasar.<sub>`
    # resolves to. If not, we retry in "compat" mode (a .pth with the `where` folders), and as a
    # last resort install the dependencies and put the component folders on sys.path ourselves.
    piplog="$VENV/.kuasar-pip.log"
    : >"$piplog"
    if (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]') >>"$piplog" 2>&1 && venv_imports_ok; then
        :
    elif (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]' \
              --config-settings editable_mode=compat) >>"$piplog" 2>&1 && venv_imports_ok; then
        log "installed in setuptools' compat editable mode (default mode failed, see $piplog)"
    else
        grep -E '^\s*error:' "$piplog" | sort -u | sed 's/^\s*/setup:   pip: /' || true
        log "WARNING: setuptools cannot build the project editable (see $piplog);"
        log "WARNING: installing the dependencies and a .pth over the component folders instead"
        install_without_build
    fi
    venv_imports_ok || die "the venv cannot import kuasar.common / the kuasar namespace is incomplete"
    echo "$want_stamp" >"$STAMP"
    log "venv ready ($VENV)"
}

# ---------------------------------------------------------------------------------------------
# The steps in order; 4. the generated stubs
# ---------------------------------------------------------------------------------------------
main() {
    step_python
    step_packages
    step_containerd
    step_runsc
    step_vhost_vsock
    step_criu
    step_pause
    step_venv
    "$VENV/bin/python" "$ROOT/scripts/gen_protos.py"
    log "done (containerd $HAVE_CONTAINERD, $("$VENV/bin/python" --version 2>&1))"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
