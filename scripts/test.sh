#!/usr/bin/env bash
# The one command that runs the whole test suite: formatting, lints, tests.
#
# Works on a fresh Debian 12 machine that has only the Rust toolchain. The
# integration tests drive real uploaders, so the tools they need (rsync, sftp,
# sftp-server) are installed with apt-get when missing. CI runs this via .ci/run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# --- system tools the tests need -------------------------------------------
missing=()
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v sftp >/dev/null 2>&1 || missing+=(openssh-client)
[ -x /usr/lib/openssh/sftp-server ] || missing+=(openssh-sftp-server)
command -v sha256sum >/dev/null 2>&1 || missing+=(coreutils)
# scripts/check-units.sh: systemd-analyze verify/security on packaging/*.service.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)

if [ "${#missing[@]}" -gt 0 ]; then
    step "Installing missing packages: ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: not root and no sudo; install these first: ${missing[*]}" >&2
        exit 1
    fi
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
else
    step "System tools present (rsync, sftp, sftp-server, sha256sum, systemd-analyze)"
fi

# --- Rust checks ------------------------------------------------------------
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        echo "error: 'cargo $tool' is not installed (rustup component add ${tool/fmt/rustfmt})" >&2
        exit 1
    fi
done

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets --locked -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --locked --all-targets"
cargo test --locked --all-targets

step "systemd units: verify, and security exposure at most 1.5"
scripts/check-units.sh "${CARGO_TARGET_DIR:-target}/debug/release-keeper"

step "All checks passed"
