#!/usr/bin/env bash
# Build the test bed's node VM: a Debian 12 (bookworm) root filesystem made with debootstrap,
# systemd as init and the unified cgroup hierarchy only (the node shape of Ubuntu 22.04+,
# Debian 12, RHEL 9 and Amazon Linux 2023), with Debian's kernel.
#
# Output, in $HOTRESTART_VM_CACHE (default /var/cache/hotrestart-vm/r<RECIPE>):
#   vmlinuz, initrd.img   the kernel and its initramfs (virtio and ext4 drivers)
#   rootfs.img            an ext4 image (sparse, 8 GiB), booted read-write with qemu -snapshot,
#                         so that every boot starts from the same image
#
# Nothing of the project is in the image: hack/vm.py shares the checkout, its Python and the
# test bed's sysroot into the machine (9p, read-only, at the same paths) and runs one command
# there. The image holds what a node has: systemd, dbus (runc's systemd cgroup driver talks
# to systemd over it), iptables and the CNI plugins, busybox.
#
# Run as root. Idempotent: a second run finds the image and exits; --force rebuilds it.

set -euo pipefail

# Bump when the recipe below changes: a new cache folder is built.
RECIPE=2
CACHE=${HOTRESTART_VM_CACHE:-/var/cache/hotrestart-vm/r$RECIPE}
MIRROR=${HOTRESTART_VM_MIRROR:-http://deb.debian.org/debian}
SIZE=8G
PACKAGES=(
    systemd systemd-sysv udev dbus kmod procps util-linux iproute2 iptables
    containernetworking-plugins busybox-static ca-certificates linux-image-amd64
    # the test bed's crit (CRIU's image tool) is a Python program of the system's Python
    python3 python3-protobuf
    # what the shared CPython (built on a bookworm host) links against
    libssl3 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 zlib1g libreadline8 libncursesw6 libgdbm6 libuuid1
)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

FORCE=0
for arg in "$@"; do
    case $arg in
    --force) FORCE=1 ;;
    -h | --help)
        sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    *)
        echo "unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

log() { printf '==> [%s] %s\n' "$(date +%T)" "$*" >&2; }

[[ $(id -u) == 0 ]] || {
    echo "build-image: run as root" >&2
    exit 1
}
if [[ $FORCE == 0 && -f $CACHE/.built ]]; then
    log "VM image ready in $CACHE"
    exit 0
fi

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    for attempt in 1 2 3; do
        # The package mirrors may be out of reach for a while.
        if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; then
            break
        fi
        ((attempt < 3)) || {
            echo "build-image: could not install ${need[*]}" >&2
            exit 1
        }
        log "apt-get install failed; again in 30s"
        sleep 30
        apt-get update -q >/dev/null || true
    done
fi

started=$SECONDS
rm -rf "$CACHE"
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

include=$(printf '%s,' "${PACKAGES[@]}")
log "debootstrap bookworm (${#PACKAGES[@]} packages beyond minbase)"
for attempt in 1 2 3; do
    if debootstrap --variant=minbase --include="${include%,}" bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
        break
    fi
    tail -5 "$work/debootstrap.log" >&2
    ((attempt < 3)) || {
        echo "build-image: debootstrap failed three times (see above)" >&2
        exit 1
    }
    log "debootstrap failed; again in 30s"
    sleep 30
    rm -rf "$root"
done

log "configuring the node"
echo hotrestart-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 hotrestart-vm\n' >"$root/etc/hosts"
: >"$root/etc/machine-id" # systemd makes one at first boot (every boot: the image is never written)
install -m 0755 "$HERE/inside.sh" "$root/usr/local/sbin/hotrestart-vm-run"
cat >"$root/etc/systemd/system/hotrestart-vm-run.service" <<'EOF'
[Unit]
Description=Run the command hack/vm.py handed to this machine, then power off
After=multi-user.target dbus.service
Wants=dbus.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/hotrestart-vm-run
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/hotrestart-vm-run.service "$root/etc/systemd/system/multi-user.target.wants/hotrestart-vm-run.service"
# No logins on this machine, and nothing that waits for a network it does not have.
for unit in getty@tty1.service serial-getty@ttyS0.service systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# 9p for the shares, bridge and netfilter for the CNI plugins: loaded before the run.
printf '%s\n' 9p 9pnet_virtio overlay br_netfilter veth bridge >"$root/etc/modules-load.d/hotrestart-vm.conf"

cp "$root"/boot/vmlinuz-* "$CACHE/vmlinuz"
cp "$root"/boot/initrd.img-* "$CACHE/initrd.img"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

log "making the ext4 image ($SIZE, sparse)"
mkfs.ext4 -q -F -L hotrestart-vm -d "$root" "$work/rootfs.img" "$SIZE"
mv "$work/rootfs.img" "$CACHE/rootfs.img"
chmod 0600 "$CACHE/rootfs.img"
touch "$CACHE/.built"
log "VM image ready in $CACHE after $((SECONDS - started))s"
