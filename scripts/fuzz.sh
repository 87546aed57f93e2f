#!/usr/bin/env bash
# Fuzzes the parsers of what uploaders send: the SHA256SUMS manifest
# (upload::manifest::parse) and the release marker (upload::marker::parse), for a
# bounded time per target. Not part of CI: run it by hand, e.g. before a release.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 300 s, all targets)
#
# Targets live in fuzz/ (a cargo-fuzz project with a [workspace] of its own, so the main
# build never compiles it). Besides "never panics", the targets assert that an accepted
# manifest holds only paths that are safe to join onto a release directory and round-trips
# through format_line, and that an accepted marker names only a valid release id.
#
# Needs:
# - cargo-fuzz: installed here with `cargo install cargo-fuzz --locked` when missing.
# - a nightly toolchain (cargo-fuzz passes -Z flags). A `nightly` rustup toolchain is
#   used when installed; otherwise the stable toolchain runs with RUSTC_BOOTSTRAP=1,
#   which makes it accept the nightly-only flags (set FUZZ_TOOLCHAIN=stable to force it).
# - a C++ compiler (libfuzzer-sys builds libFuzzer from source).
#
# The parsers are safe Rust, so the targets build without a sanitizer (faster) but with
# debug assertions and overflow checks; set FUZZ_SANITIZER=address to use ASan.
#
# Output: the grown corpus in fuzz/corpus/<target>/ (seeded from fuzz/seeds/<target>/),
# crashing inputs in fuzz/artifacts/<target>/, the libFuzzer log in fuzz/logs/<target>.log,
# and a summary at the end. Exit status 1 when a target found a crash.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

secs=${1:-300}
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(manifest_parse marker_parse)
fi
case "$secs" in
    '' | *[!0-9]*)
        echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
        exit 2
        ;;
esac

step() { printf '\n==> %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    step "Installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

toolchain=()
if [ "${FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
    step "Toolchain: $(rustc +nightly --version)"
else
    export RUSTC_BOOTSTRAP=1
    step "Toolchain: $(rustc --version) with RUSTC_BOOTSTRAP=1 (no nightly, or FUZZ_TOOLCHAIN=stable)"
fi

sanitizer=${FUZZ_SANITIZER:-none}
build_flags=(--sanitizer "$sanitizer" --debug-assertions)

step "Building the fuzz targets (${targets[*]})"
(cd fuzz && cargo "${toolchain[@]}" fuzz build "${build_flags[@]}")

mkdir -p fuzz/logs
declare -A result
failed=0
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    seeds="fuzz/seeds/$t"
    dict="fuzz/dicts/${t%%_*}.dict"
    log="fuzz/logs/$t.log"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    args=(-max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
        -max_len=4096)
    [ -f "$dict" ] && args+=(-dict="$root/$dict")
    step "Fuzzing $t for ${secs}s (log: $log)"
    start=$(date +%s)
    set +e
    (cd fuzz && cargo "${toolchain[@]}" fuzz run "${build_flags[@]}" "$t" \
        "$root/$corpus" "$root/$seeds" -- "${args[@]}") >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$(($(date +%s) - start))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
    units=$(find "$corpus" -type f | wc -l)
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
        failed=1
        tail -n 40 "$log"
        verdict="FAILED (exit $rc, $crashes artifact(s) in fuzz/artifacts/$t)"
    else
        verdict="ok, no crash"
    fi
    result[$t]="${elapsed}s, ${runs:-?} runs, coverage ${cov:-?}, corpus ${units} inputs: $verdict"
done

step "Summary"
for t in "${targets[@]}"; do
    printf '%-16s %s\n' "$t" "${result[$t]}"
done
exit "$failed"
