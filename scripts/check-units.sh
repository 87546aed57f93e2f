#!/usr/bin/env bash
# Checks the systemd units in packaging/ without a running systemd:
#   - `systemd-analyze verify` (syntax, directives, the binary exists and is executable),
#   - `systemd-analyze security --offline=yes`: the overall exposure of every unit must be
#     at most MAX_EXPOSURE (default 1.5),
#   - the directives the keeper's behaviour relies on are there (Type=notify for READY=1,
#     check-config before a reload, no restart loop on a config error's exit 2).
#
# Usage: scripts/check-units.sh [BINARY]
# BINARY (default: target/debug/release-keeper, under $CARGO_TARGET_DIR if set) stands in
# for /usr/bin/release-keeper, which verify requires to exist. Needs systemd-analyze
# (Debian package `systemd`); scripts/test.sh installs it when missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MAX_EXPOSURE="${MAX_EXPOSURE:-1.5}"
bin="${1:-${CARGO_TARGET_DIR:-target}/debug/release-keeper}"
bin="$(realpath "$bin")"
if [ ! -x "$bin" ]; then
    echo "error: $bin is not an executable; build it first (cargo build)" >&2
    exit 1
fi
command -v systemd-analyze >/dev/null 2>&1 || {
    echo "error: systemd-analyze not found (apt-get install systemd)" >&2
    exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Threshold in tenths, as --threshold wants it.
threshold="$(awk -v m="$MAX_EXPOSURE" 'BEGIN { printf "%d", m * 10 + 0.5 }')"
failed=0
for unit in packaging/*.service; do
    name="$(basename "$unit")"
    # The units as installed, except that the binary is the one just built.
    sed "s|/usr/bin/release-keeper|$bin|g" "$unit" >"$work/$name"

    printf '%s: systemd-analyze verify ... ' "$name"
    # --man=no: the man page is installed by the package, not on the build machine.
    if out="$(systemd-analyze verify --man=no "$work/$name" 2>&1)" && [ -z "$out" ]; then
        echo ok
    else
        echo FAILED
        printf '%s\n' "$out" | sed 's/^/    /'
        failed=1
    fi

    printf '%s: directives ... ' "$name"
    missing=()
    for want in '^Type=notify$' '^ExecReload=.* check-config$' '^Restart=on-failure$' \
        '^RestartPreventExitStatus=2$' '^WatchdogSec='; do
        grep -Eq "$want" "$unit" || missing+=("$want")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo ok
    else
        echo "FAILED: missing ${missing[*]}"
        failed=1
    fi

    printf '%s: systemd-analyze security ... ' "$name"
    set +e
    out="$(systemd-analyze security --offline=yes --threshold="$threshold" "$work/$name" 2>&1)"
    rc=$?
    set -e
    exposure="$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')"
    if [ "$rc" -eq 0 ] && [ -n "$exposure" ] &&
        awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
        echo "exposure $exposure (at most $MAX_EXPOSURE): ok"
    else
        echo "exposure ${exposure:-?} (at most $MAX_EXPOSURE): FAILED"
        printf '%s\n' "$out" | grep -v '^✓' | sed 's/^/    /'
        failed=1
    fi
done

exit "$failed"
