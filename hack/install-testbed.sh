#!/usr/bin/env bash
# Install the end-to-end test bed of hotrestart on a Debian 12 (bookworm) host.
#
# Bookworm's CRIU 3.17 fails `criu check` on current kernels and its
# containerd/runc are too old, but installing containerd 2.x, runc 1.3 and
# CRIU 4.x from sid with apt would upgrade libc6 and pull the system apart.
# Instead this script:
#
#   1. adds trixie and sid as apt sources, pinned low (50/40) so that nothing
#      installed on the system is ever upgraded from them;
#   2. installs the native helpers from bookworm (patchelf, busybox-static,
#      debootstrap, CNI plugins, iptables, ...) and kustomize from trixie
#      (not in bookworm);
#   3. unpacks containerd, runc and criu from sid together with their library
#      closure into a private sysroot, $PREFIX/root, and points runc and criu
#      at the sysroot's dynamic loader with a DT_RPATH (children they exec,
#      such as iptables, keep using the host's libraries);
#      $PREFIX/bin holds symlinks to containerd, ctr, containerd-shim-runc-v2,
#      runc and criu;
#   4. unpacks containerd 1.7 from trixie into $PREFIX/containerd-1.7/bin;
#   5. keeps the CRI protocol definition (runtime.v1 api.proto) from trixie's
#      golang-github-kubernetes-cri-api-dev in $PREFIX/cri/api.proto;
#   6. writes a stamp so that a second run only verifies, then runs
#      `criu check`.
#
# Run as root.  Idempotent; `--force` rebuilds $PREFIX from scratch.
# Environment: HOTRESTART_TESTBED (default /opt/hotrestart-testbed).

set -euo pipefail

PREFIX=${HOTRESTART_TESTBED:-/opt/hotrestart-testbed}
# Bump when the layout or the recipe below changes: forces a rebuild.
RECIPE=2
APT_SOURCES=/etc/apt/sources.list.d/hotrestart-testbed.sources
APT_PREFS=/etc/apt/preferences.d/hotrestart-testbed
NATIVE_PKGS=(patchelf busybox-static containernetworking-plugins iptables iproute2 file python3-protobuf debootstrap)
# Not in bookworm; self-contained (needs only libc6 >= 2.34), so taken from trixie natively.
TRIXIE_NATIVE_PKGS=(kustomize)
SYSROOT_ROOTS=(criu runc containerd)
CRI_API_PKG=golang-github-kubernetes-cri-api-dev
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

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'install-testbed: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
# shellcheck source=/dev/null
. /etc/os-release
[[ ${VERSION_CODENAME:-} == bookworm ]] ||
    die "this recipe is for Debian 12 (bookworm); found ${PRETTY_NAME:-unknown}"
[[ $(dpkg --print-architecture) == amd64 ]] || die "amd64 only"

START=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o Acquire::Retries=3 -o APT::Sandbox::User=root)
PYTHON=${PYTHON:-$(command -v python3 || true)}

# ---------------------------------------------------------------------------
# 1. apt sources for trixie + sid, pinned below bookworm
# ---------------------------------------------------------------------------

# Print a deb822 stanza for trixie+sid derived from the host's own bookworm
# entry (same mirror, components and keyring).
derive_sources() {
    local deb822=/etc/apt/sources.list.d/debian.sources
    if [[ -f $deb822 ]]; then
        awk '
            function flush() {
                if (n && main) {
                    for (i = 1; i <= n; i++) {
                        if (lines[i] ~ /^Suites:/) print "Suites: trixie sid"
                        else print lines[i]
                    }
                    found = 1
                    exit
                }
                n = 0; main = 0
            }
            /^[ \t]*$/ { flush(); next }
            {
                lines[++n] = $0
                if ($0 ~ /^Suites:/) {
                    m = split(substr($0, 8), s, /[ \t]+/)
                    for (i = 1; i <= m; i++) if (s[i] == "bookworm") main = 1
                }
            }
            END { if (!found) flush() }
        ' "$deb822"
        return
    fi
    # One-line format: "deb [opts] URI bookworm component..."
    local f line
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        line=$(grep -E '^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm[[:space:]]' "$f" | head -n1 || true)
        [[ -n $line ]] || continue
        awk '{
            opts = ""; i = 2
            if ($2 ~ /^\[/) {
                while ($i !~ /\]$/) { opts = opts " " $i; i++ }
                opts = opts " " $i; i++
            }
            uri = $i; i += 2
            comps = ""
            for (; i <= NF; i++) comps = comps (comps ? " " : "") $i
            gsub(/[][]/, "", opts)
            signed = "/usr/share/keyrings/debian-archive-keyring.gpg"
            n = split(opts, o, /[ \t]+/)
            for (j = 1; j <= n; j++) if (o[j] ~ /^signed-by=/) signed = substr(o[j], 11)
            print "Types: deb"
            print "URIs: " uri
            print "Suites: trixie sid"
            print "Components: " comps
            print "Signed-By: " signed
        }' <<<"$line"
        return
    done
}

APT_UPDATED=0
apt_update() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get "${APT_OPTS[@]}" update -qq
        APT_UPDATED=1
    fi
}

setup_apt_sources() {
    local want prefs
    want=$(derive_sources)
    [[ -n $want ]] || die "no bookworm entry found in the apt sources to derive trixie/sid from"
    want="# Written by hotrestart hack/install-testbed.sh: trixie and sid, pinned low
# (see $APT_PREFS); only used to download packages for the test bed.
$want"
    prefs="# Written by hotrestart hack/install-testbed.sh: never install or upgrade
# anything from trixie or sid unless asked for explicitly.
Package: *
Pin: release n=trixie
Pin-Priority: 50

Package: *
Pin: release n=sid
Pin-Priority: 40"
    if [[ ! -f $APT_PREFS || $(cat "$APT_PREFS") != "$prefs" ]]; then
        # Preferences first: a crash between the two writes must not leave
        # an unpinned sid source behind.
        log "writing $APT_PREFS"
        printf '%s\n' "$prefs" >"$APT_PREFS"
    fi
    if [[ ! -f $APT_SOURCES || $(cat "$APT_SOURCES") != "$want" ]]; then
        log "writing $APT_SOURCES"
        printf '%s\n' "$want" >"$APT_SOURCES"
        apt_update
    fi
}

# ---------------------------------------------------------------------------
# 2. native packages from bookworm
# ---------------------------------------------------------------------------

native_missing() {
    local p st
    for p in "${NATIVE_PKGS[@]}"; do
        st=$(dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $st == ii* ]] || echo "$p"
    done
}

install_native() {
    local missing
    missing=$(native_missing)
    [[ -n $missing ]] || return 0
    apt_update
    # shellcheck disable=SC2086
    log "apt-get install (bookworm):" $missing
    # Explicit /bookworm: never take a package from the added suites.
    # shellcheck disable=SC2046
    apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends \
        $(for p in $missing; do echo "$p/bookworm"; done)
}

install_trixie_native() {
    local p st missing=()
    for p in "${TRIXIE_NATIVE_PKGS[@]}"; do
        st=$(dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $st == ii* ]] || missing+=("$p")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    apt_update
    log "apt-get install (trixie):" "${missing[@]}"
    apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${missing[@]/%//trixie}"
}

# ---------------------------------------------------------------------------
# 3.-5. the private tree under $PREFIX
# ---------------------------------------------------------------------------

LINKS=(containerd ctr containerd-shim-runc-v2 runc criu crit)
C17_BINS=(containerd ctr containerd-shim-runc-v2)

tree_ok() {
    local f
    [[ -f $PREFIX/.stamp ]] || return 1
    [[ $(sed -n 's/^recipe=//p' "$PREFIX/.stamp") == "$RECIPE" ]] || return 1
    for f in "${LINKS[@]}"; do [[ -x $PREFIX/bin/$f ]] || return 1; done
    for f in "${C17_BINS[@]}"; do [[ -x $PREFIX/containerd-1.7/bin/$f ]] || return 1; done
    [[ -s $PREFIX/cri/api.proto ]] || return 1
    "$PREFIX/bin/runc" --version >/dev/null 2>&1 || return 1
    "$PREFIX/bin/criu" --version >/dev/null 2>&1 || return 1
    "$PREFIX/bin/crit" --help >/dev/null 2>&1 || return 1
}

deb_version() { dpkg-deb -f "$1" Version; }

build_tree() {
    [[ -n $PYTHON ]] || die "python3 is needed to compute the package closure"
    local stage="$PREFIX.new" work
    work=$(mktemp -d /tmp/hotrestart-testbed.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$work' '$stage'" EXIT
    rm -rf "$stage"
    mkdir -p "$stage"/{root,bin,containerd-1.7/bin,cri} "$work"/{sid,trixie,x}

    log "computing the dependency closure of ${SYSROOT_ROOTS[*]} in sid"
    local -a closure
    mapfile -t closure < <("$PYTHON" "$HERE/sysroot_closure.py" --suite sid "${SYSROOT_ROOTS[@]}")
    [[ ${#closure[@]} -gt 0 ]] || die "empty package closure"
    log "sysroot packages: ${closure[*]}"

    log "downloading ${#closure[@]} packages from sid"
    (cd "$work/sid" && apt-get "${APT_OPTS[@]}" download -qq "${closure[@]/%//sid}")
    log "downloading containerd and $CRI_API_PKG from trixie"
    (cd "$work/trixie" && apt-get "${APT_OPTS[@]}" download -qq containerd/trixie "$CRI_API_PKG/trixie")
    # CRIU's own image tool (pure Python), matching the CRIU above; it runs on the
    # host's python3 with bookworm's python3-protobuf.
    log "downloading python3-pycriu (crit) from sid"
    (cd "$work/x" && apt-get "${APT_OPTS[@]}" download -qq python3-pycriu/sid)

    # 3. sysroot
    local deb
    for deb in "$work"/sid/*.deb; do
        dpkg-deb -x "$deb" "$stage/root"
    done
    local L="$PREFIX/root/usr/lib/x86_64-linux-gnu" exe
    [[ -e $stage/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 ]] ||
        die "sid libc6 has no usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    for exe in usr/sbin/runc usr/sbin/criu; do
        [[ -f $stage/root/$exe ]] || die "$exe missing from the sid packages"
        # DT_RPATH (not RUNPATH): it also applies to the libraries' own
        # dependencies, so nothing leaks in from the host's /lib.
        patchelf --set-interpreter "$L/ld-linux-x86-64.so.2" \
            --force-rpath --set-rpath "$L" "$stage/root/$exe"
    done
    ln -s ../root/usr/bin/containerd "$stage/bin/containerd"
    ln -s ../root/usr/bin/ctr "$stage/bin/ctr"
    ln -s ../root/usr/bin/containerd-shim-runc-v2 "$stage/bin/containerd-shim-runc-v2"
    ln -s ../root/usr/sbin/runc "$stage/bin/runc"
    ln -s ../root/usr/sbin/criu "$stage/bin/criu"
    dpkg-deb -x "$work"/x/python3-pycriu_*.deb "$stage/crit"
    printf '#!/bin/sh\nPYTHONPATH=%s/crit/usr/lib/python3/dist-packages exec /usr/bin/python3 -m crit "$@"\n' \
        "$PREFIX" >"$stage/bin/crit"
    chmod 0755 "$stage/bin/crit"

    # 4. containerd 1.7
    dpkg-deb -x "$work"/trixie/containerd_*.deb "$work/x/c17"
    local b
    for b in "${C17_BINS[@]}"; do
        install -m 0755 "$work/x/c17/usr/bin/$b" "$stage/containerd-1.7/bin/$b"
    done

    # 5. CRI api.proto
    dpkg-deb -x "$work"/trixie/"${CRI_API_PKG}"_*.deb "$work/x/cri"
    local proto
    proto=$(find "$work/x/cri" -path '*/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto' | head -n1)
    [[ -n $proto ]] || die "api.proto not found in $CRI_API_PKG"
    install -m 0644 "$proto" "$stage/cri/api.proto"

    # 6. stamp
    {
        echo "recipe=$RECIPE"
        echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        for deb in "$work"/sid/*.deb; do
            echo "sid:$(dpkg-deb -f "$deb" Package)=$(deb_version "$deb")"
        done
        for deb in "$work"/trixie/*.deb; do
            echo "trixie:$(dpkg-deb -f "$deb" Package)=$(deb_version "$deb")"
        done
    } >"$stage/.stamp.tmp"

    rm -rf "$PREFIX"
    mv "$stage" "$PREFIX"
    mv "$PREFIX/.stamp.tmp" "$PREFIX/.stamp"
    rm -rf "$work"
    trap - EXIT
}

# ---------------------------------------------------------------------------

setup_apt_sources
install_native
install_trixie_native
if [[ $FORCE -eq 1 ]] || ! tree_ok; then
    apt_update
    build_tree
    tree_ok || die "the test bed under $PREFIX does not work after installing it"
    log "installed the test bed into $PREFIX"
else
    log "test bed under $PREFIX is up to date"
fi

log "versions:"
{
    echo "  containerd      $("$PREFIX/bin/containerd" --version 2>&1 | head -n1)"
    echo "  containerd 1.7  $("$PREFIX/containerd-1.7/bin/containerd" --version 2>&1 | head -n1)"
    echo "  runc            $("$PREFIX/bin/runc" --version 2>&1 | head -n1)"
    echo "  criu            $("$PREFIX/bin/criu" --version 2>&1 | head -n1)"
    echo "  cri api.proto   $PREFIX/cri/api.proto ($(sed -n 's/^trixie:'"$CRI_API_PKG"'=//p' "$PREFIX/.stamp"))"
    echo "  busybox         $(dpkg-query -W -f '${Version}' busybox-static)"
    echo "  cni plugins     $(dpkg-query -W -f '${Version}' containernetworking-plugins)"
} >&2

log "criu check"
check=$("$PREFIX/bin/criu" check 2>&1) || true
printf '%s\n' "$check" >&2
grep -q 'Looks good' <<<"$check" || die "criu check failed: CRIU cannot checkpoint on this kernel"

log "done in $(($(date +%s) - START))s"
