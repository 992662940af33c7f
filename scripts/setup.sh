#!/usr/bin/env bash
# Install what tcptrace needs on this machine, then say nothing more on later runs.
#   distribution packages (bcc for the system Python, venv), kernel headers
#   (the nearest Debian headers when none match the running kernel), tracefs,
#   and a venv in .venv that sees the distribution's bcc.
# Idempotent: a second run only checks, in well under a second.
#   scripts/setup.sh            all of it
#   scripts/setup.sh --system   the machine only, no .venv (what scripts/install needs)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$here/.venv"
kernel=$(uname -r)
say() { echo "setup: $*" >&2; }
die() { echo "setup: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): it installs packages and mounts tracefs"
case "${1:-}" in
"") system_only=0 ;;
--system) system_only=1 ;;
*) die "usage: $0 [--system]" ;;
esac

. /etc/os-release
family="${ID_LIKE:-} $ID"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    if [ -z "$(find /var/lib/apt/lists -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        apt-get update -qq >&2
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

headers_ok() { [ -d "/lib/modules/$kernel/build/include" ]; }

link_nearest_headers() {
    # No headers package matches this kernel: link Debian's generic ones. The
    # BPF program reads tracepoint fields only, so a mismatch is harmless.
    local arch build common
    arch=$(dpkg --print-architecture)
    apt_install "linux-headers-$arch"
    build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -1)
    [ -n "$build" ] || die "no linux-headers-*-$arch tree under /usr/src"
    common="${build%-"$arch"}-common"
    [ -d "$common" ] || die "missing $common (package linux-headers-*-common)"
    mkdir -p "/lib/modules/$kernel"
    ln -sfn "$build" "/lib/modules/$kernel/build"
    ln -sfn "$common" "/lib/modules/$kernel/source"
    say "linked headers $(basename "$build") for kernel $kernel"
}

case "$family" in
*debian*|*ubuntu*)
    apt_install python3-bpfcc python3-venv python3-pip bpftool iproute2
    if ! headers_ok; then
        if apt-cache show "linux-headers-$kernel" >/dev/null 2>&1; then
            apt_install "linux-headers-$kernel"
        else
            link_nearest_headers
        fi
    fi
    ;;
*fedora*|*rhel*)
    rpm -q python3-bcc kernel-devel >/dev/null 2>&1 \
        || dnf install -y python3-bcc "kernel-devel-$kernel" bpftool >&2
    ;;
*)
    headers_ok || die "unknown distribution '$ID': install bcc's Python bindings and kernel headers by hand"
    ;;
esac
headers_ok || die "kernel headers for $kernel are still missing under /lib/modules/$kernel/build"

if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null \
        || die "cannot mount tracefs on /sys/kernel/tracing"
fi

[ "$system_only" -eq 1 ] && exit 0

# A venv that sees the distribution's bcc (it imports only in the system Python).
stamp="$venv/.tcptrace-stamp"
want=$(cat "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    # pip before 21.3 (Debian 11's 20.3) cannot install a pyproject.toml-only tree
    # as editable (PEP 660): a newer pip first, from wherever pip installs from
    if ! "$venv/bin/python" -c 'import sys, pip
sys.exit(tuple(int(x) for x in pip.__version__.split(".")[:2]) < (21, 3))'; then
        "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev]" 2>&1 \
        | grep -v "is ignored: it is neither" >&2 || true
    "$venv/bin/python" -c "import tcptrace" || die "pip could not install tcptrace into $venv"
    echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import bcc, click, prometheus_client, pyroute2' \
    || die "the venv cannot import bcc, click, prometheus_client and pyroute2"
