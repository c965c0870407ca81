#!/usr/bin/env bash
# A single-node Ceph cluster with a RADOS Gateway (S3) on 127.0.0.1, for tests.
#
#   object-store.sh up      install (apt) what is missing, start mon + mgr + osd + radosgw,
#                           create an RGW user and a bucket, print the S3 environment
#                           (KEY=VALUE lines on stdout; progress goes to stderr).
#                           Idempotent: a running cluster is only checked, a stopped one
#                           (data directory kept) is restarted, a half-made one is redone.
#   object-store.sh env     print the S3 environment of a running cluster.
#   object-store.sh status  `ceph -s` and the daemons' pids and RSS.
#   object-store.sh check   S3 smoke test: 64 MiB PUT/GET, If-None-Match: *, multipart.
#   object-store.sh sysroot (experimental) unpack a newer Ceph from another Debian suite
#                           (default sid: 20.2 tentacle) into $OBJSTORE_CEPH_ROOT
#                           (default /var/lib/hotrestart-objstore-sysroot), for OBJSTORE_CEPH_ROOT=... up.
#                           Needs that suite in the apt sources (hack/install-testbed.sh adds
#                           trixie and sid, pinned low); installs nothing system-wide.
#   object-store.sh down    stop every daemon started here (pid files), detach loop
#                           devices backed by the data directory, remove the directory.
#
# No systemd, no cephadm, no containers: the daemons are started directly, each
# daemonized with its pid file under the data directory, and run as root.
# The OSD is BlueStore on a sparse file ($DATA/osd/ceph-0/block, created by
# `ceph-osd --mkfs` itself, as vstart.sh does): no loop device and no mount needed.
#
# Environment:
#   HOTRESTART_OBJSTORE_DIR   data directory        (default /var/lib/hotrestart-objstore)
#   OBJSTORE_VENV             python venv (boto3)   (default /var/lib/hotrestart-objstore-venv)
#   OBJSTORE_RGW_PORT         radosgw beast port    (default 7480)
#   OBJSTORE_MON_PORT         monitor msgr2 port    (default 13300; msgr1 is off)
#   OBJSTORE_OSD_SIZE         BlueStore file size   (default 20G, sparse)
#   OBJSTORE_BUCKET           bucket                (default hotrestart)
#   OBJSTORE_PREFIX           key prefix            (default store)
#   OBJSTORE_REGION           AWS_REGION printed    (default us-east-1)
#   OBJSTORE_CEPH_ROOT        experimental: run ceph-mon, ceph-osd, radosgw, radosgw-admin
#                             and monmaptool from a private sysroot holding a
#                             newer Ceph (unpacked .debs, e.g. sid's 20.2 tentacle: see
#                             `object-store.sh sysroot`), through that sysroot's dynamic loader.
#                             No mgr in that mode (sid's ceph-mgr needs python 3.13); the host's
#                             `ceph` CLI (pacific) does the admin commands.

set -euo pipefail

DATA=${HOTRESTART_OBJSTORE_DIR:-/var/lib/hotrestart-objstore}
VENV=${OBJSTORE_VENV:-/var/lib/hotrestart-objstore-venv}
RGW_PORT=${OBJSTORE_RGW_PORT:-7480}
MON_PORT=${OBJSTORE_MON_PORT:-13300}
OSD_SIZE=${OBJSTORE_OSD_SIZE:-20G}
BUCKET=${OBJSTORE_BUCKET:-hotrestart}
PREFIX=${OBJSTORE_PREFIX:-store}
REGION=${OBJSTORE_REGION:-us-east-1}
RGW_UID=hotrestart
CONF=$DATA/ceph.conf
PKGS=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common)
BINS=(ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool uuidgen)
# Daemons in start order; `down` stops them in reverse.
DAEMONS=(mon.a mgr.x osd.0 client.rgw.x)
CEPH_ROOT=${OBJSTORE_CEPH_ROOT:-}
[[ -z $CEPH_ROOT ]] || DAEMONS=(mon.a osd.0 client.rgw.x)

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    printf 'object-store: %s\n' "$*" >&2
    exit 1
}

ceph_() { timeout 60 ceph -c "$CONF" --connect-timeout 15 "$@"; }

# A Ceph program: the host's, or the sysroot's run by the sysroot's loader.
# cbin [--timeout=SECS] PROG ARGS...
cbin() {
    local pre=()
    if [[ $1 == --timeout=* ]]; then
        pre=(timeout "${1#--timeout=}")
        shift
    fi
    local prog=$1
    shift
    if [[ -n $CEPH_ROOT ]]; then
        local L=$CEPH_ROOT/usr/lib/x86_64-linux-gnu
        "${pre[@]}" "$L/ld-linux-x86-64.so.2" --library-path "$L/ceph:$L" "$CEPH_ROOT/usr/bin/$prog" "$@"
    else
        "${pre[@]}" "$prog" "$@"
    fi
}

pidfile() { echo "$DATA/run/$1.pid"; }

# pid of a running daemon, from its pid file, checked against /proc (the pid must still
# be a process whose command line names our ceph.conf).
daemon_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
    echo "$pid"
}

# Every process whose command line names our ceph.conf (also those whose pid file is lost).
our_pids() {
    local p
    for p in /proc/[0-9]*; do
        [[ -r $p/cmdline ]] || continue
        if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-c $CONF"; then
            echo "${p#/proc/}"
        fi
    done
}

# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------

install_packages() {
    local b missing=0
    for b in "${BINS[@]}"; do command -v "$b" >/dev/null || missing=1; done
    [[ -d /usr/lib/x86_64-linux-gnu/rados-classes ]] || missing=1
    if [[ $missing -eq 1 ]]; then
        [[ $(id -u) -eq 0 ]] || die "must run as root to install ${PKGS[*]}"
        log "apt-get install ${PKGS[*]} (bookworm: Ceph 16.2 pacific)"
        export DEBIAN_FRONTEND=noninteractive
        # Never let the packages' maintainer scripts start services.
        local prc=/usr/sbin/policy-rc.d made_prc=0
        if [[ ! -e $prc ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$prc"
            chmod 755 "$prc"
            made_prc=1
        fi
        apt-get -o APT::Sandbox::User=root update -qq || true
        apt-get -o APT::Sandbox::User=root -o Acquire::Retries=3 install -y -q \
            --no-install-recommends "${PKGS[@]}" uuid-runtime >&2
        [[ $made_prc -eq 0 ]] || rm -f "$prc"
    fi
    if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import boto3' 2>/dev/null; then
        log "python venv with boto3 in $VENV"
        local py
        py=$(command -v python3) || die "python3 not found"
        if ! "$py" -m venv "$VENV" >&2 2>/dev/null; then
            apt-get -o APT::Sandbox::User=root install -y -q --no-install-recommends python3-venv >&2
            /usr/bin/python3 -m venv "$VENV" >&2
        fi
        "$VENV/bin/pip" install -q boto3 >&2
    fi
}

# ---------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------

write_conf() {
    local fsid=$1
    cat >"$CONF" <<EOF
# Written by object-store.sh: single-node test cluster on 127.0.0.1.
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$MON_PORT]
mon_initial_members = a
public_network = 127.0.0.0/8
public_addr = 127.0.0.1
cluster_network = 127.0.0.0/8
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
ms_bind_ipv6 = false
ms_bind_ipv4 = true
ms_async_op_threads = 2
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $DATA/keyring
run_dir = $DATA/run
admin_socket = $DATA/run/\$cluster-\$name.asok
pid_file = $DATA/run/\$name.pid
log_file = $DATA/log/\$name.log
mon_cluster_log_file = $DATA/log/cluster.log
crash_dir = $DATA/crash
log_to_stderr = false
err_to_stderr = false
log_max_recent = 500
# one OSD: no replication, no warnings about it
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_allow_pool_delete = true
# read by the mon when it makes the first MgrMap
mgr_initial_modules = iostat
mon_max_pg_per_osd = 1000
mon_warn_on_insecure_global_id_reclaim_allowed = false
# the host disk may be fuller than Ceph likes; never let the mon stop for it
mon_data_avail_warn = 2
mon_data_avail_crit = 1
$(if [[ -n $CEPH_ROOT ]]; then
        L=$CEPH_ROOT/usr/lib/x86_64-linux-gnu
        printf '# programs from the sysroot %s: their plugins too\n' "$CEPH_ROOT"
        printf 'plugin_dir = %s\nerasure_code_dir = %s\nosd_class_dir = %s\n' \
            "$L/ceph" "$L/ceph/erasure-code" "$L/rados-classes"
        # tentacle allows only AES-256 cephx keys by default; the host's pacific CLI and
        # keyring use AES-128 ("authentication failed due to unallowed cipher type: aes")
        printf 'mon_auth_emergency_allowed_ciphers = aes,aes256k\nmon_warn_on_insecure_key_types = false\n'
    fi)

[mon]
mon_data = $DATA/mon/\$cluster-\$id

[mgr]
mgr_data = $DATA/mgr/\$cluster-\$id
# not loaded at all (the always-on ones, balancer crash devicehealth orchestrator pg_autoscaler
# progress rbd_support status telemetry volumes, must stay or health turns to HEALTH_ERR)
mgr_disabled_modules = diskprediction_local restful nfs dashboard prometheus k8sevents insights snap_schedule mirroring influx zabbix telegraf alerts localpool selftest test_orchestrator osd_perf_query osd_support stats cephadm rook

[osd]
osd_data = $DATA/osd/\$cluster-\$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $(numfmt --from=iec "$OSD_SIZE")
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
bdev_enable_discard = false
# 896 MiB is the smallest osd_memory_target pacific accepts; a target, not a limit
osd_memory_target = 939524096
osd_memory_cache_min = 67108864
bluestore_rocksdb_options = compression=kNoCompression,max_write_buffer_number=2,min_write_buffer_number_to_merge=1,recycle_log_file_num=2,write_buffer_size=33554432,writable_file_max_buffer_size=0,compaction_readahead_size=2097152,max_background_compactions=1,max_total_wal_size=134217728
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
osd_scrub_load_threshold = 0.5
osd_max_scrubs = 1

[client.rgw.x]
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw_thread_pool_size = 16
rgw_data = $DATA/rgw/\$cluster-\$id
rgw_enable_usage_log = false
rgw_dynamic_resharding = false
EOF
}

# Always the host's ceph-authtool: tentacle's makes AES-256 keys, which the host's pacific
# `ceph` CLI cannot read ("error setting modifier ... Malformed input"); tentacle accepts
# pacific's AES-128 keys.
gen_keyring() {
    local kr=$DATA/keyring
    ceph-authtool --create-keyring "$kr" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$kr" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$kr" --gen-key -n mgr.x \
        --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$kr" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
    ceph-authtool "$kr" --gen-key -n client.rgw.x \
        --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
    chmod 600 "$kr"
}

bootstrap() {
    log "bootstrapping a new cluster in $DATA"
    rm -rf "$DATA"
    mkdir -p "$DATA"/{run,log,crash,mon/ceph-a,mgr/ceph-x,osd/ceph-0,rgw/ceph-rgw.x}
    chmod 700 "$DATA"
    local fsid
    fsid=$(uuidgen)
    write_conf "$fsid"
    gen_keyring
    cbin monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DATA/monmap" >/dev/null
    cbin ceph-mon -c "$CONF" --mkfs -i a --monmap "$DATA/monmap" --keyring "$DATA/keyring"
    uuidgen >"$DATA/osd-uuid"
    echo "$fsid" >"$DATA/fsid"
}

mkfs_osd() {
    local uuid id
    uuid=$(<"$DATA/osd-uuid")
    id=$(ceph_ osd new "$uuid")
    [[ $id == 0 ]] || die "ceph osd new gave id '$id', expected 0"
    log "ceph-osd --mkfs (bluestore on a $OSD_SIZE sparse file)"
    cbin ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >"$DATA/log/osd-mkfs.out" 2>&1 ||
        {
            cat "$DATA/log/osd-mkfs.out" >&2
            die "ceph-osd --mkfs failed"
        }
    touch "$DATA/osd/ceph-0/.mkfs-done"
}

start_daemon() {
    local name=$1 pid
    if pid=$(daemon_pid "$name"); then
        log "$name already running (pid $pid)"
        return 0
    fi
    rm -f "$(pidfile "$name")"
    log "starting $name"
    case $name in
    mon.a) cbin ceph-mon -c "$CONF" -i a ;;
    mgr.x) cbin ceph-mgr -c "$CONF" -i x ;;
    osd.0) cbin ceph-osd -c "$CONF" -i 0 ;;
    client.rgw.x) cbin radosgw -c "$CONF" -n client.rgw.x ;;
    esac
    local i
    for i in $(seq 1 100); do
        daemon_pid "$name" >/dev/null && return 0
        sleep 0.1
    done
    die "$name did not write its pid file; see $DATA/log/$name.log"
}

wait_for() {
    local what=$1 secs=$2 i
    shift 2
    for ((i = 0; i < secs * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "timed out after ${secs}s waiting for $what"
}

osd_up() { [[ $(ceph_ osd dump --format json | "$VENV/bin/python" -c 'import json,sys; d=json.load(sys.stdin); print(sum(o["up"] for o in d["osds"]))') -ge 1 ]]; }
rgw_up() { curl -fsS -o /dev/null "http://127.0.0.1:$RGW_PORT/"; }

ensure_user() {
    if [[ ! -s $DATA/s3-credentials ]]; then
        local ak sk
        ak=$(od -An -tx1 -N10 /dev/urandom | tr -d ' \n' | tr a-f A-F)
        sk=$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')
        printf '%s %s\n' "$ak" "$sk" >"$DATA/s3-credentials.new"
        mv "$DATA/s3-credentials.new" "$DATA/s3-credentials"
    fi
    local ak sk
    read -r ak sk <"$DATA/s3-credentials"
    if ! cbin --timeout=60 radosgw-admin -c "$CONF" user info --uid "$RGW_UID" >/dev/null 2>&1; then
        log "radosgw-admin user create --uid $RGW_UID"
        cbin --timeout=60 radosgw-admin -c "$CONF" user create --uid "$RGW_UID" \
            --display-name "hotrestart test bed" --access-key "$ak" --secret-key "$sk" >/dev/null
    fi
}

ensure_bucket() {
    local ak sk
    read -r ak sk <"$DATA/s3-credentials"
    AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk "$VENV/bin/python" - "$RGW_PORT" "$BUCKET" "$REGION" <<'EOF'
import sys, boto3, botocore.config, botocore.exceptions
port, bucket, region = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name=region,
                  config=botocore.config.Config(s3={"addressing_style": "path"}))
try:
    s3.head_bucket(Bucket=bucket)
except botocore.exceptions.ClientError:
    s3.create_bucket(Bucket=bucket)
    print(f"==> created bucket {bucket}", file=sys.stderr)
# The data pool is made on the first object written: make it now, not in the first test.
s3.put_object(Bucket=bucket, Key=".objstore-warmup", Body=b"x")
s3.delete_object(Bucket=bucket, Key=".objstore-warmup")
EOF
}

print_env() {
    local ak sk
    read -r ak sk <"$DATA/s3-credentials"
    cat <<EOF
AWS_ACCESS_KEY_ID=$ak
AWS_SECRET_ACCESS_KEY=$sk
AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
AWS_REGION=$REGION
HOTRESTART_STORE=s3://$BUCKET/$PREFIX
EOF
}

cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    local t0=$SECONDS
    install_packages
    if [[ ! -f $DATA/.bootstrapped ]]; then
        # Nothing, or a half-made cluster: stop what it may have started, start over.
        if [[ -d $DATA ]]; then cmd_down; fi
        bootstrap
    fi
    start_daemon mon.a
    wait_for "the monitor" 60 ceph_ mon stat
    [[ -n $CEPH_ROOT ]] || start_daemon mgr.x
    [[ -f $DATA/osd/ceph-0/.mkfs-done ]] || mkfs_osd
    start_daemon osd.0
    wait_for "osd.0 up" 120 osd_up
    touch "$DATA/.bootstrapped"
    start_daemon client.rgw.x
    wait_for "radosgw on 127.0.0.1:$RGW_PORT" 180 rgw_up
    ensure_user
    ensure_bucket
    log "up in $((SECONDS - t0))s"
    print_env
}

cmd_env() {
    [[ -s $DATA/s3-credentials ]] || die "no cluster in $DATA (run: $0 up)"
    print_env
}

cmd_status() {
    local d pid
    for d in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$d"); then
            printf '%-14s pid %-8s rss %s KiB\n' "$d" "$pid" "$(awk '/^VmRSS/{print $2}' "/proc/$pid/status")"
        else
            printf '%-14s not running\n' "$d"
        fi
    done
    if [[ -f $CONF ]]; then ceph_ -s || true; fi
}

# stop_pids SECS PID...: SIGTERM, wait up to SECS, then SIGKILL.
stop_pids() {
    local secs=$1 pid i alive
    shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        alive=0
        for pid in "$@"; do [[ -d /proc/$pid ]] && alive=1; done
        [[ $alive -eq 0 ]] && return 0
        sleep 0.1
    done
    for pid in "$@"; do
        if [[ -d /proc/$pid ]]; then
            log "pid $pid ignored SIGTERM for ${secs}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "$@"; do [[ -d /proc/$pid ]] && alive=1; done
        [[ $alive -eq 0 ]] && return 0
        sleep 0.1
    done
}

cmd_down() {
    local stage d pid pids=()
    # radosgw first, while the cluster can still answer its shutdown; then mgr and osd;
    # the monitor last.
    for stage in client.rgw.x "mgr.x osd.0" mon.a; do
        pids=()
        for d in $stage; do
            if pid=$(daemon_pid "$d"); then
                log "stopping $d (pid $pid)"
                pids+=("$pid")
            fi
        done
        # tentacle's radosgw takes ~25 s to stop ("dedup_bg shutdown waiting..."): do not
        # wait that long for a test bed whose data goes away anyway
        stop_pids "$([[ $stage == client.rgw.x ]] && echo 8 || echo 30)" "${pids[@]}"
    done
    # strays whose pid file is gone (e.g. a half-made `up`)
    if [[ -f $CONF ]]; then
        pids=()
        for pid in $(our_pids); do
            log "stopping stray pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
            pids+=("$pid")
        done
        stop_pids 20 "${pids[@]}"
    fi
    # loop devices backed by files in the data directory (none in the default setup)
    local dev
    while read -r dev; do
        [[ -n $dev ]] || continue
        log "detaching $dev"
        umount "$dev" 2>/dev/null || true
        losetup -d "$dev" || true
    done < <(losetup -nO NAME,BACK-FILE 2>/dev/null | awk -v d="$DATA/" 'index($2, d) == 1 {print $1}')
    # anything mounted under the data directory (none in the default setup)
    awk -v d="$DATA/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
        umount "$m" || umount -l "$m"
    done
    if [[ -d $DATA ]]; then
        log "removing $DATA"
        rm -rf "$DATA"
    fi
}

cmd_check() {
    [[ -s $DATA/s3-credentials ]] || die "no cluster in $DATA (run: $0 up)"
    local ak sk
    read -r ak sk <"$DATA/s3-credentials"
    AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT \
        AWS_REGION=$REGION "$VENV/bin/python" "$(dirname "$0")/objstore/s3check.py" "$BUCKET" "$PREFIX"
}

cmd_sysroot() {
    local root=${OBJSTORE_CEPH_ROOT:-/var/lib/hotrestart-objstore-sysroot} suite=${OBJSTORE_CEPH_SUITE:-sid}
    local work
    local policy
    policy=$(apt-cache policy radosgw)
    grep -qE "[[:space:]]$suite/main" <<<"$policy" ||
        die "no $suite in the apt sources (see hack/install-testbed.sh); apt-cache policy radosgw"
    work=$(mktemp -d /tmp/objstore-sysroot.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    log "dependency closure of radosgw ceph-osd ceph-mon ceph-base in $suite"
    python3 - "$suite" >"$work/pkgs" <<'PYEOF'
import subprocess, sys
suite = sys.argv[1]
# never needed to run the daemons from the sysroot (or used from the host)
skip = set("""systemd cron cron-daemon-common sudo lvm2 dmeventd passwd login.defs adduser
base-passwd debianutils sysvinit-utils libpam-runtime logrotate smartmontools nvme-cli parted
gdisk hdparm e2fsprogs logsave ceph-volume dmidecode xfsprogs cryptsetup-bin psmisc
readline-common libdebconfclient0 sensible-utils debconf perl-base dpkg install-info libc-bin
base-files tzdata iproute2 iptables""".split())
def skipped(n):
    return n in skip or n.startswith(("python3", "binutils", "libbinutils", "libgprofng", "libsframe", "libctf"))
todo, seen, out = ["radosgw", "ceph-osd", "ceph-mon", "ceph-base"], set(), []
while todo:
    batch = [p for p in dict.fromkeys(todo) if p not in seen]
    todo = []
    if not batch:
        break
    seen.update(batch)
    text = subprocess.run(["apt-cache", "show", "--no-all-versions", *(f"{p}/{suite}" for p in batch)],
                          capture_output=True, text=True).stdout
    for stanza in text.split("\n\n"):
        fields, name = {}, None
        for line in stanza.splitlines():
            if line[:1] in " \t" and fields:
                fields[last] += " " + line.strip()
            elif ":" in line:
                last, _, v = line.partition(":")
                fields[last] = v.strip()
        name = fields.get("Package")
        if not name:
            continue
        out.append(name)
        for key in ("Depends", "Pre-Depends"):
            for group in fields.get(key, "").split(","):
                dep = group.split("|")[0].strip().split(" ")[0].split(":")[0]
                if dep and dep not in seen and not skipped(dep):
                    todo.append(dep)
print("\n".join(dict.fromkeys(out)))
PYEOF
    log "downloading $(wc -l <"$work/pkgs") packages from $suite"
    mkdir -p "$work/debs" "$work/root"
    # shellcheck disable=SC2046
    (cd "$work/debs" && apt-get -o APT::Sandbox::User=root -o Acquire::Retries=3 download -qq \
        $(sed "s|\$|/$suite|" "$work/pkgs"))
    local deb
    for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    local L=$work/root/usr/lib/x86_64-linux-gnu
    "$L/ld-linux-x86-64.so.2" --library-path "$L/ceph:$L" "$work/root/usr/bin/radosgw" --version >&2 ||
        die "radosgw from the sysroot does not run"
    rm -rf "$root"
    mv "$work/root" "$root"
    rm -rf "$work"
    trap - EXIT
    log "sysroot ready: OBJSTORE_CEPH_ROOT=$root $0 up"
}

case ${1:-} in
sysroot) cmd_sysroot ;;
up) cmd_up ;;
down) cmd_down ;;
env) cmd_env ;;
status) cmd_status ;;
check) cmd_check ;;
*)
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
