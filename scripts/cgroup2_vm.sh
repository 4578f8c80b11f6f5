#!/usr/bin/env bash
# Run tests on a cgroup v2 host with systemd, in a VM, from a cgroup v1 (or any) Linux host.
#
#   bash scripts/cgroup2_vm.sh [PYTEST ARGS...]     (default: $CGROUP2_DEFAULT_TESTS)
#
# Why a VM: a host's cgroup controllers are bound to one hierarchy at boot, so a v1 or hybrid host
# cannot give a test the unified hierarchy with its controllers. The VM is a Debian 13 root made by
# debootstrap from the machine's own Debian archive (scripts/debian_mirror.py), set up inside by
# scripts/setup.sh as any fresh machine is, then booted by QEMU with its own kernel and systemd (which
# mounts cgroup v2 only). A unit in it runs pytest and powers the VM off; the log and exit status are
# read back from its disk image. The root is kept under .cgroup2-vm/ and reused: a second run only
# copies the project's files in again and reruns setup, which then finds everything in place.
#
# Environment: CGROUP2_VM_ACCEL (tcg by default: a stock kernel hangs under some nested KVM; kvm where
# it works), CGROUP2_VM_TIMEOUT (seconds for the whole boot and test run, 1800), CGROUP2_VM_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${CGROUP2_VM_DIR:-$ROOT/.cgroup2-vm}
GUEST=$DIR/root
IMAGE=$DIR/disk.img
ACCEL=${CGROUP2_VM_ACCEL:-tcg}
TIMEOUT=${CGROUP2_VM_TIMEOUT:-1800}
SUITE=trixie
# The tests that exercise cgroups through real runc, containerd, wasm and gVisor pods (gVisor's also
# systemd's noexec /run), the units that read and write cgroup files themselves, and the installed
# systemd unit under a real systemd.
CGROUP2_DEFAULT_TESTS="tests/unit/test_oom_watch.py tests/unit/test_cgroup_attach.py tests/unit/test_cgroup_controllers.py
tests/unit/test_runc_exec_paths.py tests/unit/test_pod_service_cgroup.py tests/unit/test_pod_leftovers.py
tests/unit/test_gvisor_pause_rootfs.py tests/integration/test_runc_cri.py tests/integration/test_runc_task_server_crash.py
tests/integration/test_wasm_cri.py tests/integration/test_wasm_task_api.py tests/integration/test_gvisor_cri.py
tests/integration/test_systemd_units.py"
# Packages of the VM beyond debootstrap's minimal base: a booting system with systemd, a kernel with its
# initramfs, and what scripts/setup.sh expects of any Debian machine.
GUEST_PACKAGES=systemd,systemd-sysv,udev,linux-image-amd64,initramfs-tools,ca-certificates,kmod,iproute2,procps
IMAGE_SIZE=12G  # sparse: the root takes ~2 GB after setup; the rest is room for the tests' images and logs
MEMORY_MB=6144
RESULT_DIR=/root/cgroup2-result  # in the guest

say() { echo "cgroup2-vm: $*" >&2; }

need_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

unmount_guest() {
    local m
    for m in tmp run dev sys proc; do
        if mountpoint -q "$GUEST/$m"; then umount -R "$GUEST/$m"; fi
    done
}

make_guest_root() {
    [[ -f $GUEST/.kuasar-root ]] && return
    local sources=$DIR/archive.sources uri keyring
    rm -rf "$GUEST"
    mkdir -p "$DIR"
    "$ROOT/.venv/bin/python" "$ROOT/scripts/debian_mirror.py" "$SUITE" "$sources"
    uri=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' "$sources" | head -1)
    say "debootstrap $SUITE into $GUEST"
    debootstrap --variant=minbase --include="$GUEST_PACKAGES" "$SUITE" "$GUEST" "$uri" >"$DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$DIR/debootstrap.log" >&2; exit 1; }
    keyring=/usr/share/keyrings/debian-archive-keyring.pgp
    [[ -f $GUEST$keyring ]] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    rm -f "$GUEST/etc/apt/sources.list"
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: %s\n' \
        "$uri" "$SUITE" "$SUITE" "$keyring" >"$GUEST/etc/apt/sources.list.d/debian.sources"
    # The same ways out as this machine: its resolver, the CAs it added, its pip configuration.
    cp /etc/resolv.conf "$GUEST/etc/"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$GUEST/usr/local/share/ca-certificates/"
        in_guest "update-ca-certificates >/dev/null"
    fi
    if [[ -f /etc/pip.conf ]]; then cp /etc/pip.conf "$GUEST/etc/"; fi
    echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$GUEST/etc/fstab"
    echo cgroup2-vm >"$GUEST/etc/hostname"
    cat >"$GUEST/etc/systemd/system/kuasar-cgroup2-tests.service" <<EOF
[Unit]
Description=kuasar tests on cgroup v2, then power off
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /root/cgroup2-run.sh
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/kuasar-cgroup2-tests.service \
        "$GUEST/etc/systemd/system/multi-user.target.wants/kuasar-cgroup2-tests.service"
    touch "$GUEST/.kuasar-root"
}

# Run a command as root of the guest's tree: its own mount namespace with the tree pivoted to / (not
# chroot: user namespaces, which runsc's setup checks, cannot be made from a chroot), / shared as
# systemd leaves it.
in_guest() {
    mountpoint -q "$GUEST/proc" || mount -t proc proc "$GUEST/proc"
    mountpoint -q "$GUEST/sys" || { mount --rbind /sys "$GUEST/sys"; mount --make-rslave "$GUEST/sys"; }
    mountpoint -q "$GUEST/dev" || { mount --rbind /dev "$GUEST/dev"; mount --make-rslave "$GUEST/dev"; }
    mountpoint -q "$GUEST/run" || mount -t tmpfs tmpfs "$GUEST/run"
    mountpoint -q "$GUEST/tmp" || mount -t tmpfs tmpfs "$GUEST/tmp"
    mkdir -p "$GUEST/.oldroot"
    local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    local certs=/etc/ssl/certs/ca-certificates.crt
    unshare -m --propagation private bash -c '
        set -e; mount --rbind "$1" "$1"; cd "$1"; pivot_root . .oldroot; umount -l /.oldroot
        mount --make-rshared /
        exec env -i HOME=/root PATH="$2" SSL_CERT_FILE="$3" PIP_CERT="$3" \
            ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} bash -c "$4"' \
        in-guest "$GUEST" "$path" "$certs" "$1"
}

copy_project() {
    mkdir -p "$GUEST/root/kuasar"
    (cd "$ROOT" && git ls-files -co --exclude-standard -z) |
        tar -C "$ROOT" --null -T - -cf - | tar -C "$GUEST/root/kuasar" -xf -
}

write_runner() {
    local tests=("$@")
    # shellcheck disable=SC2206 # split on purpose: one path per word
    ((${#tests[@]})) || tests=($CGROUP2_DEFAULT_TESTS)
    {
        echo '#!/bin/bash'
        echo "rm -rf $RESULT_DIR; mkdir -p $RESULT_DIR; cd /root/kuasar"
        echo 'export HOME=/root KUASAR_PREFIX=/root/kuasar/.prefix PATH=/root/kuasar/.prefix/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        echo "{ echo \"cgroup filesystem: \$(stat -fc %T /sys/fs/cgroup), controllers: \$(cat /sys/fs/cgroup/cgroup.controllers)\""
        printf '  .venv/bin/python -m pytest -q -rfE -p no:cacheprovider'
        printf ' %q' "${tests[@]}"
        echo "; echo \$? > $RESULT_DIR/rc; } > $RESULT_DIR/log 2>&1"
        echo 'sync'
    } >"$GUEST/root/cgroup2-run.sh"
}

boot_and_test() {
    local kernel initrd mnt=$DIR/mnt
    kernel=$(ls "$GUEST"/boot/vmlinuz-* | sort -V | tail -1)
    initrd=$(ls "$GUEST"/boot/initrd.img-* | sort -V | tail -1)
    unmount_guest
    rm -f "$IMAGE"
    say "making the disk image"
    mkfs.ext4 -q -F -d "$GUEST" "$IMAGE" "$IMAGE_SIZE"
    say "booting ($ACCEL; console in $DIR/console.log)"
    local accel=(-accel "$ACCEL")
    [[ $ACCEL == tcg ]] && accel=(-accel tcg,thread=multi)
    timeout "$TIMEOUT" qemu-system-x86_64 -M q35 "${accel[@]}" -cpu max -smp "$(nproc)" -m "$MEMORY_MB" \
        -kernel "$kernel" -initrd "$initrd" -append "root=/dev/vda rw console=ttyS0 quiet" \
        -drive "file=$IMAGE,if=virtio,format=raw" -display none -serial "file:$DIR/console.log" \
        -no-reboot -nic none || say "QEMU exited with status $? (timeout: $TIMEOUT s)"
    mkdir -p "$mnt"
    mount -o loop,ro,noload "$IMAGE" "$mnt"  # noload: a guest cut off by the timeout left its journal dirty
    local rc=1
    if [[ -f $mnt$RESULT_DIR/log ]]; then cat "$mnt$RESULT_DIR/log"; fi
    if [[ -f $mnt$RESULT_DIR/rc ]]; then rc=$(cat "$mnt$RESULT_DIR/rc"); else say "the tests did not finish"; fi
    umount "$mnt"
    return "$rc"
}

main() {
    [[ $(id -u) == 0 ]] || { say "run as root"; exit 1; }
    [[ -x $ROOT/.venv/bin/python ]] || { say "run scripts/setup.sh first"; exit 1; }
    need_host_tools
    trap unmount_guest EXIT
    make_guest_root
    copy_project
    say "scripts/setup.sh in the guest's root (log: $DIR/setup.log)"
    in_guest "cd /root/kuasar && bash scripts/setup.sh" >"$DIR/setup.log" 2>&1 || { tail -30 "$DIR/setup.log" >&2; exit 1; }
    write_runner "$@"
    boot_and_test
}

main "$@"
