#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and tests it on this machine:
#   1. cargo build --release; man pages and shell completions generated from the CLI
#      (`release-keeper man --dir`, `release-keeper completions SHELL`);
#   2. cargo deb --no-build -> target/debian/release-keeper_<version>_<arch>.deb;
#   3. dpkg -i; checks the installed files, the system user and the conffile; runs
#      `/usr/bin/release-keeper check-config` on the installed default config;
#   4. dpkg --purge (unless --keep).
#
# Usage: scripts/deb.sh [--build-only | --keep]
#   --build-only  stop after building the .deb (no root needed)
#   --keep        leave the package installed
#
# Needs root (or sudo) for dpkg. Installs cargo-deb from crates.io when missing.
# Not part of scripts/test.sh (slow: a release build and cargo-deb).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-test}"
case "$mode" in
test | --build-only | --keep) ;;
*)
    echo "usage: $0 [--build-only | --keep]" >&2
    exit 2
    ;;
esac

step() { printf '\n==> %s\n' "$*"; }

target="${CARGO_TARGET_DIR:-target}"
assets="target/deb-assets" # fixed path: Cargo.toml's [package.metadata.deb] names it

if ! cargo deb --version >/dev/null 2>&1; then
    step "Installing cargo-deb"
    cargo install cargo-deb --locked
fi

step "cargo build --release --locked"
cargo build --release --locked
bin="$target/release/release-keeper"

step "Man pages and completions from the CLI definition -> $assets/"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" man --dir "$assets/man"
gzip -9n "$assets"/man/*.1
"$bin" completions bash >"$assets/completions/release-keeper.bash"
"$bin" completions zsh >"$assets/completions/_release-keeper"
"$bin" completions fish >"$assets/completions/release-keeper.fish"
ls "$assets/man" | sed 's/^/    /'

step "cargo deb --no-build"
deb="$(cargo deb --no-build | tail -n 1)"
[ -f "$deb" ] || {
    echo "error: cargo deb did not report a .deb (got: $deb)" >&2
    exit 1
}
echo "$deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p' | sed 's/^/    /'
echo "    contents:"
dpkg-deb --contents "$deb" | awk '{print "      " $6}'

if [ "$mode" = "--build-only" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: installing the package needs root or sudo (or use --build-only)" >&2
    exit 1
fi

if dpkg -s release-keeper >/dev/null 2>&1; then
    echo "error: release-keeper is already installed here; remove it first (dpkg -r release-keeper)" >&2
    exit 1
fi

cleanup() {
    if [ "$mode" != "--keep" ] && dpkg -s release-keeper >/dev/null 2>&1; then
        step "dpkg --purge release-keeper"
        $SUDO dpkg --purge release-keeper
    fi
}
trap cleanup EXIT

step "dpkg -i $deb"
$SUDO dpkg -i "$deb"

step "Installed files"
fail=0
check() {
    if "$@" >/dev/null 2>&1; then
        echo "    ok: ${*: -1}"
    else
        echo "    MISSING: ${*: -1}"
        fail=1
    fi
}
check test -x /usr/bin/release-keeper
unitdir=/lib/systemd/system
[ -f "$unitdir/release-keeper.service" ] || unitdir=/usr/lib/systemd/system
check test -f "$unitdir/release-keeper.service"
check test -f "$unitdir/release-keeper@.service"
check test -f /etc/release-keeper/config.toml
check test -d /etc/release-keeper/sites.d
check test -f /usr/share/man/man1/release-keeper.1.gz
check test -f /usr/share/man/man1/release-keeper-run.1.gz
check test -f /usr/share/bash-completion/completions/release-keeper
check test -f /usr/share/zsh/vendor-completions/_release-keeper
check test -f /usr/share/fish/vendor_completions.d/release-keeper.fish
check test -f /usr/share/doc/release-keeper/examples/config.toml
check getent passwd release-keeper
check getent group release-keeper
if dpkg-query --showformat='${Conffiles}\n' --show release-keeper |
    grep -q '^ /etc/release-keeper/config.toml '; then
    echo "    ok: /etc/release-keeper/config.toml is a conffile"
else
    echo "    NOT A CONFFILE: /etc/release-keeper/config.toml"
    fail=1
fi
if command -v man >/dev/null 2>&1; then
    man -l /usr/share/man/man1/release-keeper.1.gz 2>/dev/null | head -n 4 | sed 's/^/    /' || true
fi

step "/usr/bin/release-keeper --version; check-config (as the installed default config)"
/usr/bin/release-keeper --version
/usr/bin/release-keeper check-config
# The commented example must be valid too (its site root may not exist: only a warning).
/usr/bin/release-keeper --config /usr/share/doc/release-keeper/examples/config.toml check-config
# ... and the service user can read the config.
if command -v runuser >/dev/null 2>&1; then
    runuser -u release-keeper -- /usr/bin/release-keeper check-config
fi

step "systemd-analyze verify / security on the installed units"
if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify --man=no "$unitdir/release-keeper.service" "$unitdir/release-keeper@.service"
    systemd-analyze security --offline=yes --threshold=15 "$unitdir/release-keeper.service" | tail -n 1
else
    echo "    (systemd-analyze not installed; skipped)"
fi

[ "$fail" -eq 0 ] || {
    echo "error: the package is missing files (see above)" >&2
    exit 1
}
step "The package installs and works"
