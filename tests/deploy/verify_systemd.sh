#!/usr/bin/env bash
# Verify deploy/systemd/wsgate.service with `systemd-analyze verify`.
#
# Works offline and without systemd as PID 1 (containers, CI). Installs Debian's `systemd`
# package if systemd-analyze is missing (needs root and apt). verify checks that the
# ExecStart/ExecStartPre/ExecReload binaries exist, so the unit is copied to a temporary
# directory with /usr/local/bin/wsgate rewritten to a built wsgate (target/release or
# target/debug) if there is one, else to /bin/true.
#
# Exit status: 0 when verify is clean; 1 when it fails or prints any warning or error
# about the unit (verify itself exits 0 on e.g. an unknown key, so its output is checked).
# `systemd-analyze security` is shown for information only (WSGATE_SECURITY=0 skips it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
unit_src="$root/deploy/systemd/wsgate.service"

[ -f "$unit_src" ] || { echo "verify_systemd: $unit_src not found" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "verify_systemd: systemd-analyze missing, installing Debian's systemd package" >&2
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "verify_systemd: need root and apt-get to install systemd" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# A path that exists and is executable, standing in for /usr/local/bin/wsgate.
stub=/bin/true
for cand in "$root/target/release/wsgate" "$root/target/debug/wsgate"; do
    if [ -x "$cand" ]; then stub=$cand; break; fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unit="$tmp/wsgate.service"
sed "s#/usr/local/bin/wsgate#${stub}#g" "$unit_src" > "$unit"
# Keep the source's line numbers in messages meaningful: the rewrite is line-for-line.

echo "verify_systemd: $(systemd-analyze --version | head -n1)"
echo "verify_systemd: systemd-analyze verify $unit_src (binary stand-in: $stub)"
set +e
out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$unit" 2>&1)
rc=$?
set -e

status=0
if [ "$rc" -ne 0 ]; then
    echo "verify_systemd: systemd-analyze verify exited $rc" >&2
    status=1
fi
if [ -n "$out" ]; then
    # Any line naming the unit (or its temporary copy) is a finding about the unit.
    while IFS= read -r line; do
        [ -z "$line" ] && continue
        if [[ "$line" == *wsgate* || "$line" == *"$tmp"* ]]; then
            echo "verify_systemd: FINDING: ${line//$tmp\//deploy/systemd/}" >&2
            status=1
        else
            echo "verify_systemd: note (not about the unit): $line" >&2
        fi
    done <<< "$out"
fi

if [ "${WSGATE_SECURITY:-1}" != 0 ]; then
    echo "verify_systemd: systemd-analyze security (informational):"
    systemd-analyze security --offline=yes --no-pager "$unit" 2>&1 | grep -E '✗|Overall exposure' || true
fi

if [ "$status" -eq 0 ]; then
    echo "verify_systemd: OK, systemd-analyze verify is clean"
else
    echo "verify_systemd: FAILED" >&2
fi
exit "$status"
