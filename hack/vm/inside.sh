#!/bin/bash
# Runs once in the test bed's node VM (hotrestart-vm-run.service), as root, after boot:
# mounts the shares hack/vm.py named on the kernel command line, runs the command it left
# in the output share, records how it ended, and powers the machine off.
#
#   hotrestart.share=TAG:PATH   a read-only 9p share mounted at PATH (the host's own path)
#   hotrestart.out=TAG          the read-write share holding command.sh; receives
#                               output.log, node.txt and rc
set -u

out=/run/hotrestart-vm-out
finish() {
    sync
    systemctl poweroff --no-block
    exit 0
}

read -r -a words </proc/cmdline
outtag=""
for w in "${words[@]}"; do
    case $w in
    hotrestart.share=*)
        spec=${w#hotrestart.share=}
        tag=${spec%%:*}
        path=${spec#*:}
        mkdir -p "$path"
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 "$tag" "$path" ||
            echo "hotrestart-vm: cannot mount share $tag at $path" >&2
        ;;
    hotrestart.out=*) outtag=${w#hotrestart.out=} ;;
    esac
done
if [[ -z $outtag ]]; then
    echo "hotrestart-vm: no hotrestart.out= on the kernel command line" >&2
    finish
fi
mkdir -p "$out"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$outtag" "$out"; then
    echo "hotrestart-vm: cannot mount the output share" >&2
    finish
fi

{
    echo "kernel $(uname -r)"
    echo "init $(cat /proc/1/comm)"
    echo "cgroupfs $(stat -fc %T /sys/fs/cgroup)"
    echo "controllers $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null)"
    echo "cpus $(nproc)"
} >"$out/node.txt"

cd /
timeout --signal=KILL "$(cat "$out/timeout" 2>/dev/null || echo 3600)" bash "$out/command.sh" >"$out/output.log" 2>&1
echo $? >"$out/rc"
finish
