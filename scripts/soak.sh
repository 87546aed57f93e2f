#!/bin/sh
# Crash soak: the crash test of tests/crash.rs with hundreds of kill -9 points.
#
#   scripts/soak.sh [KILLS]        (default 300)
#
# Each kill point: stage a new version of a ~2000-file, ~3 MB upload, drop the marker,
# SIGKILL the service somewhere in finalize, swap or prune (the delay sweeps from 0 to
# 1.2x a measured release), check that `current` is complete, restart, and check that
# the upload ends activated, no .partial.* or temporary link remains, `verify --all`
# passes and the journal parses. Prints how many kill points were tried; exits non-zero
# on the first broken invariant (with the service's log).
#
# Environment: RK_SOAK_BUDGET (seconds, default 7200) bounds the run; CARGO_TARGET_DIR
# as usual. Builds in release mode (the service's speed is what a crash races against).
set -eu
KILLS=${1:-300}
cd "$(dirname "$0")/.."
start=$(date +%s)
RK_CRASH_VERBOSE=${RK_CRASH_VERBOSE:-1} RK_CRASH_KILLS=$KILLS RK_CRASH_MIN=$KILLS RK_CRASH_BUDGET=${RK_SOAK_BUDGET:-7200} \
    cargo test --release --test crash -- --nocapture --test-threads=1
echo "soak: $KILLS kill points, all invariants held ($(( $(date +%s) - start ))s)"
