#!/usr/bin/env bash
# kuasar-py environment setup (called by `make setup`).
#
# Idempotent and cheap on rerun: every step first checks whether its result is already in place.
#   1. distro packages (runc, CNI plugins, static busybox, QEMU, ...), installed only when missing;
#   2. containerd >= 2.1 in a project-local prefix (${KUASAR_PREFIX:-<repo>/.prefix}/bin), taken from
#      Debian's `unstable` suite of the mirror this machine is already configured with, through a
#      private apt state so the machine's own apt configuration is never modified;
#      vhost-device-vsock (the micro-VMs' vsock backend) the same way, from unstable (2c);
#   3. a Python venv (${VENV:-<repo>/.venv}) with the project installed editable with its dev extras;
#   4. generated protobuf/gRPC stubs (scripts/gen_protos.py skips when up to date).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${KUASAR_PREFIX:-$ROOT/.prefix}"
VENV="${VENV:-$ROOT/.venv}"
MIN_CONTAINERD="2.1"

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

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
PY="$(find_python)" || die "Python >= 3.11 is required (set PYTHON=/path/to/python3.11+); found: $(python3 --version 2>&1 || echo none)"

# ---------------------------------------------------------------------------------------------
# 1. Distro packages
# ---------------------------------------------------------------------------------------------
PACKAGES=(runc containernetworking-plugins busybox-static iproute2 iptables util-linux mount kmod procps
          ca-certificates debian-archive-keyring)
# QEMU (TCG micro-VMs of vm-agent / vmm-sandboxer); vhost-device-vsock comes from unstable (2c).
PACKAGES+=(qemu-system-x86)
# zstd: the guest image build unpacks Debian 13's zstd-compressed kernel (vmlinuz) with it.
PACKAGES+=(zstd)
# A C compiler and musl for kuasar-pause, the few-KB program every pod process becomes (2d): linked
# statically against musl it is 34 KB and keeps ~12 KB of private memory per pod (glibc's static
# startup: 690 KB and ~44 KB per pod).
PACKAGES+=(gcc libc6-dev musl-tools)
# The venv module of Debian's python3 needs python3-venv (ensurepip); other interpreters ship it.
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    PACKAGES+=(python3-venv)
fi
# PyInstaller (`make binaries`) bundles the shared libpython, which Debian's python3 does not use.
if [[ "$(readlink -f "$PY")" == /usr/bin/python3* ]]; then
    PACKAGES+=(libpython3-dev)
fi

missing_packages() {
    local pkg status
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
        [[ "$status" == ii* ]] || echo "$pkg"
    done
}

mapfile -t MISSING < <(missing_packages "${PACKAGES[@]}")
if ((${#MISSING[@]})); then
    log "installing distro packages: ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
    mapfile -t STILL < <(missing_packages "${PACKAGES[@]}")
    ((${#STILL[@]} == 0)) || die "packages still missing after apt-get install: ${STILL[*]}"
else
    log "distro packages present"
fi
[[ -x /bin/busybox ]] || die "/bin/busybox missing (package busybox-static)"
/bin/busybox --list >/dev/null 2>&1 || die "/bin/busybox does not run"

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

# Prints "URI<TAB>Signed-By" of the machine's main Debian archive (not -security / updates).
debian_mirror() {
    "$PY" - <<'PYEOF'
import glob, re, sys

def stanzas_deb822(text):
    cur, key = {}, None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                yield cur
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()

entries = []  # (uri, suites, signed_by)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        continue
    for st in stanzas_deb822(text):
        if st.get("enabled", "yes").lower() == "no" or "deb" not in st.get("types", "").split():
            continue
        for uri in st.get("uris", "").split():
            entries.append((uri, st.get("suites", "").split(), st.get("signed-by", "")))
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
        if not m:
            continue
        opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
        entries.append((m.group(2), [m.group(3)], opts.get("signed-by", "")))

def score(entry):
    uri, suites, _ = entry
    if "security" in uri or any("security" in s for s in suites):
        return None
    if not uri.startswith(("http://", "https://", "file:", "mirror")):
        return None
    s = 0
    if re.search(r"/debian/?$", uri) or re.search(r"/debian/\d{8}T\d{6}Z/?$", uri):
        s += 2
    if any(re.fullmatch(r"[a-z]+", x) for x in suites):  # a plain suite: bookworm, stable, ...
        s += 1
    return s

ranked = [(score(e), i, e) for i, e in enumerate(entries) if score(e) is not None]
if not ranked:
    sys.exit("no Debian archive entry found in /etc/apt/sources.list{,.d}")
ranked.sort(key=lambda t: (-t[0], t[1]))
uri, _, signed_by = ranked[0][2]
print(f"{uri.rstrip('/')}\t{signed_by}")
PYEOF
}

# fetch_debian_package SUITE PACKAGE STAGE: download PACKAGE from the machine's own Debian mirror's SUITE
# with a private apt state (the machine's apt configuration is never touched) and unpack it into STAGE.
# Prints the .deb's file name; returns non-zero (after saying why) when it cannot. The index and the
# .deb are not kept: only what the caller installs from STAGE is.
fetch_debian_package() {
    local suite="$1" package="$2" stage="$3" aptdir="$PREFIX/apt-$2" mirror uri signed_by
    mirror="$(debian_mirror)" || { log "no Debian mirror found in /etc/apt" >&2; return 1; }
    uri="${mirror%%$'\t'*}"
    signed_by="${mirror#*$'\t'}"
    [[ -n "$signed_by" ]] || signed_by=/usr/share/keyrings/debian-archive-keyring.gpg
    log "fetching $package from Debian $suite (private apt state in $aptdir)" >&2
    rm -rf "$aptdir" "$stage"
    mkdir -p "$aptdir/etc" "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/download"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' "$uri" "$suite" "$signed_by" \
        >"$aptdir/etc/private.sources"
    : >"$aptdir/etc/status"
    local apt_opts=(
        -o "Dir::Etc::SourceList=$aptdir/etc/private.sources"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "Dir::State::Lists=$aptdir/lists"
        -o "Dir::State::status=$aptdir/etc/status"
        -o "Dir::Cache=$aptdir/cache"
        -o "APT::Architectures::=$(dpkg --print-architecture)"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
        -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
    )
    local deb=""
    if apt-get -qq "${apt_opts[@]}" update >/dev/null \
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

mkdir -p "$PREFIX/bin"
have="$(containerd_version "$PREFIX/bin/containerd" 2>/dev/null || true)"
if version_ok "$have"; then
    log "containerd $have present in $PREFIX/bin"
else
    sys_containerd="$(command -v containerd 2>/dev/null || true)"
    sys_version=""
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
    have="$(containerd_version "$PREFIX/bin/containerd")"
    version_ok "$have" || die "containerd in $PREFIX/bin is '${have:-missing}', need >= $MIN_CONTAINERD"
    log "containerd $have installed in $PREFIX/bin"
fi

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

have_runsc="$(runsc_date "$PREFIX/bin/runsc")"
if runsc_ok "$have_runsc"; then
    log "runsc $have_runsc present in $PREFIX/bin"
else
    sys_runsc="$(command -v runsc 2>/dev/null || true)"
    sys_runsc_date=""
    [[ -n "$sys_runsc" && "$sys_runsc" != "$PREFIX/bin/runsc" ]] && sys_runsc_date="$(runsc_date "$sys_runsc")"
    if runsc_ok "$sys_runsc_date"; then
        log "using the system runsc $sys_runsc_date ($sys_runsc)"
        ln -sfn "$sys_runsc" "$PREFIX/bin/runsc"
        printf 'runsc %s\nsource system %s\n' "$sys_runsc_date" "$sys_runsc" >"$PREFIX/runsc.version"
    elif suite="$(runsc_suite)"; then
        install_runsc_from_debian "$suite" && log "runsc $(runsc_date "$PREFIX/bin/runsc") installed in $PREFIX/bin"
    else
        log "WARNING: not a Debian release this script knows; runsc not installed (gVisor tests will skip)"
    fi
fi

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

have_vhost="$(vhost_vsock_version "$PREFIX/bin/vhost-device-vsock")"
if [[ -n "$have_vhost" ]]; then
    log "vhost-device-vsock $have_vhost present in $PREFIX/bin"
elif install_vhost_vsock_from_unstable; then
    log "vhost-device-vsock $(vhost_vsock_version "$PREFIX/bin/vhost-device-vsock") installed in $PREFIX/bin"
fi

# ---------------------------------------------------------------------------------------------
# 2d. kuasar-pause in $PREFIX/bin (the pod process's program once its namespaces are set up)
# ---------------------------------------------------------------------------------------------
PAUSE_SRC="$ROOT/common/kuasar/common/native/kuasar-pause.c"
PAUSE_BIN="$PREFIX/bin/kuasar-pause"
if [[ ! -x "$PAUSE_BIN" || "$PAUSE_SRC" -nt "$PAUSE_BIN" || "$0" -nt "$PAUSE_BIN" ]]; then
    log "building kuasar-pause"
    musl-gcc -Os -static -s -Wall -Werror -o "$PAUSE_BIN.new" "$PAUSE_SRC"
    mv -f "$PAUSE_BIN.new" "$PAUSE_BIN"
else
    log "kuasar-pause present in $PREFIX/bin"
fi

# ---------------------------------------------------------------------------------------------
# 3. Python venv with the project installed editable
# ---------------------------------------------------------------------------------------------
# Component folders each hold one part of the `kuasar` namespace package (no kuasar/__init__.py).
COMPONENTS=(common runc-sandboxer wasm-sandboxer vmm-sandboxer quark-sandboxer vm-agent ctl)
STAMP="$VENV/.kuasar-setup-stamp"
want_stamp="$(sha256sum <"$ROOT/pyproject.toml" | cut -d' ' -f1) $(readlink -f "$PY")"

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

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] && venv_imports_ok; then
    log "venv up to date ($VENV)"
else
    if [[ ! -x "$VENV/bin/python" ]] || [[ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$PY")" ]]; then
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
fi

# ---------------------------------------------------------------------------------------------
# 4. Generated stubs
# ---------------------------------------------------------------------------------------------
"$VENV/bin/python" "$ROOT/scripts/gen_protos.py"
log "done (containerd $have, $("$VENV/bin/python" --version 2>&1))"
