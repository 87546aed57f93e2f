#!/usr/bin/env bash
# bench/compare.sh: release-keeper against the shell recipe, side by side (issue 6).
#
# One run measures, on a generated web-app tree (20,000 files / 300 MB, nested dirs):
#   1. a full first release: `release-keeper finalize` vs the recipe
#      (cp -a, sha256sum -c, ln -s + mv -T)                    target ratio <= 0.8
#   2. an incremental release, 1% of files changed: release-keeper vs the same recipe
#      (target ratio <= 0.1) and vs rsync -a --link-dest + sha256sum -c (target < 1)
#   3. the service's latency from the marker's close(2) to `current` swapped, for a
#      100-file upload, settle_time 0                          target median < 50 ms
#   4. peak RSS of `finalize` on a 200,000-file release, first and next  target < 64 MB
#   5. CPU ticks used by the idle service over 60 s           target 0
# and prints a markdown table with each figure, the ratio, the target and PASS/FAIL, and
# the machine it ran on.
#
# Both sides get the same input: deploy-cache/ with its SHA256SUMS, generated (and, for
# the incremental case, updated) outside the timed section. Each figure is the median of
# BENCH_RUNS runs, warm (upload in the page cache, as right after an upload) and, when
# /proc/sys/vm/drop_caches is writable (root), cold (`sync; echo 3 > drop_caches` before
# every timed run). Dirty data of a run is synced before the next one starts, outside the
# timing, so no run pays for the previous one's writeback. Sides alternate order per run.
# Neither side prunes in the timed runs (keep = 1000; the recipe of the issue has no prune
# step). Reference rows, not targets: the recipe followed by `sync` (release-keeper's
# release is durable, it syncs before renaming the release into place; the recipe's is
# not), and `cp -al` of a copy of the base release (the floor for any design that makes
# each release a tree of hard links). Figures move with the machine's load: the load average
# is printed with them.
#
# Environment:
#   RK_BIN            release-keeper binary (default: this checkout's
#                     target/release/release-keeper, always rebuilt with
#                     `cargo build --release` so the figures are for the code at hand)
#   BENCH_TMPDIR      where the work directory is made (default /var/tmp; must not be
#                     tmpfs: the disk is part of what is measured)
#   BENCH_FILES=20000 BENCH_BYTES=300000000 BENCH_CHANGED=0.01 BENCH_RUNS=3
#   BENCH_COLD=auto|0|1      also measure with dropped caches (auto: if possible)
#   BENCH_LAT_ITER=20 BENCH_LAT_FILES=100
#   BENCH_RSS_FILES=200000 BENCH_RSS_BYTES=100000000
#   BENCH_IDLE_SECS=60
#   BENCH_ONLY="full inc lat rss idle"   sections to run
#   BENCH_KEEP=1      keep the work directory
#   BENCH_RESULTS=F   also write the final table to F
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
BENCH_START=$EPOCHREALTIME

FILES=${BENCH_FILES:-20000}
BYTES=${BENCH_BYTES:-300000000}
CHANGED=${BENCH_CHANGED:-0.01}
RUNS=${BENCH_RUNS:-3}
COLD=${BENCH_COLD:-auto}
LAT_ITER=${BENCH_LAT_ITER:-20}
LAT_FILES=${BENCH_LAT_FILES:-100}
RSS_FILES=${BENCH_RSS_FILES:-200000}
RSS_BYTES=${BENCH_RSS_BYTES:-100000000}
IDLE_SECS=${BENCH_IDLE_SECS:-60}
ONLY=${BENCH_ONLY:-full inc lat rss idle}

log() { printf '[%6.1fs] %s\n' "$(echo "$EPOCHREALTIME - $BENCH_START" | bc)" "$*" >&2; }
die() { echo "compare.sh: $*" >&2; exit 1; }
want() { [[ " $ONLY " == *" $1 "* ]]; }

for tool in python3 sha256sum rsync bc /usr/bin/time; do
    command -v "$tool" >/dev/null || die "$tool is required (apt-get install time rsync bc)"
done

# --- the binary --------------------------------------------------------------------------
RK=${RK_BIN:-}
if [[ -z $RK ]]; then
    target=${CARGO_TARGET_DIR:-$REPO/target}
    log "building release-keeper (cargo build --release) into $target"
    (cd "$REPO" && CARGO_TARGET_DIR=$target cargo build --release --quiet)
    RK=$target/release/release-keeper
fi
[[ -x $RK ]] || die "no release-keeper binary at $RK"

# --- the work directory --------------------------------------------------------------------
parent=${BENCH_TMPDIR:-}
if [[ -z $parent ]]; then
    parent=/var/tmp
fi
W=$(mktemp -d "$parent/rk-bench.XXXXXX")
FSTYPE=$(findmnt -no FSTYPE -T "$W" 2>/dev/null || stat -f -c %T "$W")
[[ $FSTYPE == tmpfs ]] && log "warning: $W is on tmpfs; the disk is not being measured"

# Deleting is slow on some disks (ext4 mounted with `discard` issues a synchronous
# discard per freed file), so trees are moved into a graveyard (a rename: instant) and
# deleted in parallel while nothing is being timed (during the RSS and idle sections).
G=0
bury() {
    local d
    mkdir -p "$W/graveyard"
    for d in "$@"; do
        [[ -e $d || -L $d ]] || continue
        G=$((G + 1))
        mv "$d" "$W/graveyard/$G"
    done
}
# reap DIR: deletes DIR with parallel rm processes.
reap() {
    [[ -d $1 ]] || return 0
    ((EUID == 0)) || chmod -R u+w "$1" 2>/dev/null || true
    find "$1" -mindepth 3 -maxdepth 5 -type d -print0 2>/dev/null |
        xargs -0 -r -n 8 -P 8 rm -rf 2>/dev/null || true
    rm -rf "$1"
}
REAPERS=()
reap_graveyard_bg() {
    [[ -d $W/graveyard ]] || return 0
    mv "$W/graveyard" "$W/reaping.$G"
    reap "$W/reaping.$G" &
    REAPERS+=($!)
}

SERVICE_PID=
cleanup() {
    if [[ -n $SERVICE_PID ]] && kill -0 "$SERVICE_PID" 2>/dev/null; then
        kill -TERM "$SERVICE_PID" 2>/dev/null || true
        wait "$SERVICE_PID" 2>/dev/null || true
    fi
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "work directory kept: $W"
    else
        log "cleaning up $W"
        [[ ${#REAPERS[@]} -gt 0 ]] && wait "${REAPERS[@]}" 2>/dev/null
        [[ -d $W/graveyard ]] && reap "$W/graveyard"
        reap "$W"
        log "done"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $COLD == auto ]]; then
    if [[ -w /proc/sys/vm/drop_caches ]]; then COLD=1; else COLD=0; fi
fi
MODES=warm
[[ $COLD == 1 ]] && MODES="warm cold"

S=$W/site          # release-keeper's site; its deploy-cache/ is the input of every side
SH=$W/recipe-cp    # the cp recipe's root
RS=$W/recipe-rsync # the rsync --link-dest recipe's root
CFG=$W/config.toml
cat >"$CFG" <<EOF
# keep is high so that no timed run prunes: the recipe has no prune step either.
[defaults]
keep = 1000
[sites.bench]
root = "$S"
[sites.rss]
root = "$W/rss"
EOF

# --- helpers ---------------------------------------------------------------------------------
median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.3f}" if v else "nan")' "$@"; }
ratio() { python3 -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f"{a/b:.3f}" if b else "nan")' "$1" "$2"; }
le() { python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)' "$1" "$2"; }
lt() { python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$1" "$2"; }
verdict() { if "$@"; then echo PASS; else echo FAIL; fi; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }

# prep warm|cold: flush the previous run's dirty data; then either drop every cache or
# make sure the upload is in the page cache (as right after it was written).
prep() {
    sync
    if [[ $1 == cold ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        find "$2" -type f -exec cat {} + >/dev/null
    fi
}

# timed LABEL CMD...: runs CMD, appends "wall user+sys" (seconds) to $W/t.LABEL.
timed() {
    local label=$1
    shift
    local t0 t1
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o "$W/cpu.tmp" "$@" >>"$W/cmd.log" 2>&1 || {
        tail -20 "$W/cmd.log" >&2
        die "failed: $*"
    }
    t1=$EPOCHREALTIME
    read -r u s <"$W/cpu.tmp"
    echo "$(echo "$t1 - $t0" | bc) $(echo "$u + $s" | bc)" >>"$W/t.$label"
}
walls() { cut -d' ' -f1 "$W/t.$1"; }
cpus() { cut -d' ' -f2 "$W/t.$1"; }
med_wall() { median $(walls "$1"); }
med_cpu() { median $(cpus "$1"); }

RK_FINALIZE=("$RK" --config "$CFG" --log-format json finalize)

reset_site() {
    bury "$S/releases" "$S/.release-keeper" "$S/current" "$S/shared"
    "$RK" --config "$CFG" init bench >/dev/null
}
reset_root() {
    bury "$1"
    mkdir -p "$1/releases"
}
# Removes every release of a recipe root but the one `current` points at.
trim_root() {
    local keep d
    keep=$(basename "$(readlink "$1/current")")
    for d in "$1"/releases/*; do
        [[ $(basename "$d") == "$keep" ]] || bury "$d"
    done
}

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

# --- machine -----------------------------------------------------------------------------------
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MEM=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
DEV=$(df -P "$W" | awk 'NR==2 {print $1}')
REV=$(TZ=UTC git -C "$REPO" log -1 --format='%h, committed %cd' --date=format-local:%Y-%m-%dT%H:%MZ 2>/dev/null || echo unknown)
BIN_DATE=$(date -u -r "$RK" +%Y-%m-%dT%H:%MZ)
log "release-keeper: $RK (built $BIN_DATE; repo HEAD $REV)"
log "work dir: $W ($FSTYPE on $DEV); modes: $MODES; runs: $RUNS; load: $(loadavg)"
LOAD_START=$(loadavg)

# --- the tree --------------------------------------------------------------------------------------
if want full || want inc; then
    log "generating $FILES files / $BYTES bytes"
    mkdir -p "$S"
    python3 "$HERE/gen.py" tree "$S/deploy-cache" --files "$FILES" --bytes "$BYTES" --seed 1
    TREE_BYTES=$(du -sb "$S/deploy-cache" | cut -f1)
    TREE_DIRS=$(find "$S/deploy-cache" -type d | wc -l)
    reset_site
    reset_root "$SH"
    reset_root "$RS"
fi

# --- 1. full first release ---------------------------------------------------------------------
if want full; then
    for mode in $MODES; do
        for ((r = 1; r <= RUNS; r++)); do
            log "full release, $mode, run $r/$RUNS (load $(loadavg))"
            order="rk sh"
            ((r % 2 == 0)) && order="sh rk"
            for side in $order; do
                if [[ $side == rk ]]; then
                    reset_site
                    prep "$mode" "$S/deploy-cache"
                    timed "full.rk.$mode" "${RK_FINALIZE[@]}" bench --id "full-$mode-$r"
                else
                    reset_root "$SH"
                    prep "$mode" "$S/deploy-cache"
                    timed "full.sh.$mode" "$HERE/recipe.sh" cp "$S/deploy-cache" "$SH" "full-$mode-$r"
                    # Not part of the recipe: what making its result durable costs
                    # (release-keeper syncs before it renames the release into place).
                    timed "full.sync.$mode" sync
                fi
            done
        done
        rk=$(med_wall "full.rk.$mode") sh=$(med_wall "full.sh.$mode") q=$(ratio "$rk" "$sh")
        row "1. full first release ($mode)" "${rk} s (cpu $(med_cpu "full.rk.$mode") s)" \
            "cp recipe ${sh} s (cpu $(med_cpu "full.sh.$mode") s)" "$q" "<= 0.8" "$(verdict le "$q" 0.8)"
        durable=$(python3 -c 'import sys,statistics; print(f"{statistics.median(float(a)+float(b) for a,b in zip(sys.argv[1].split(), sys.argv[2].split())):.3f}")' \
            "$(walls "full.sh.$mode" | tr '\n' ' ')" "$(walls "full.sync.$mode" | tr '\n' ' ')")
        row "1. (reference, $mode) recipe made durable" "${rk} s" \
            "cp recipe then \`sync\` ${durable} s" "$(ratio "$rk" "$durable")" "-" "info"
    done
fi

# --- 2. incremental release --------------------------------------------------------------------
if want inc; then
    if ! want full; then
        prep warm "$S/deploy-cache"
        timed setup "${RK_FINALIZE[@]}" bench --id base
        "$HERE/recipe.sh" cp "$S/deploy-cache" "$SH" base
    fi
    # The rsync recipe starts from its own copy of the current upload, made like the cp
    # recipe makes one.
    reset_root "$RS"
    "$HERE/recipe.sh" cp "$S/deploy-cache" "$RS" base >>"$W/cmd.log" 2>&1
    prev_rs=base
    # The floor's `cp -al` links to a copy of the base release, never to the keeper's own
    # files: a link made behind the keeper's back moves their ctime, and the keeper then
    # copies them once instead of sharing them (see "Healing and drift" in the README),
    # which would be the floor measurement slowing down the next keeper run.
    cp -a "$(readlink -f "$S/current")" "$W/floor-src"
    sync
    seed=100
    for mode in $MODES; do
        for ((r = 1; r <= RUNS; r++)); do
            seed=$((seed + 1))
            log "incremental release, $mode, run $r/$RUNS (load $(loadavg))"
            python3 "$HERE/gen.py" mutate "$S/deploy-cache" --fraction "$CHANGED" --seed "$seed" 2>>"$W/cmd.log"
            trim_root "$SH"
            trim_root "$RS"
            id="inc-$mode-$r"
            order="rk sh rs al"
            ((r % 2 == 0)) && order="al rs sh rk"
            for side in $order; do
                prep "$mode" "$S/deploy-cache"
                case $side in
                rk) timed "inc.rk.$mode" "${RK_FINALIZE[@]}" bench --id "$id" ;;
                sh) timed "inc.sh.$mode" "$HERE/recipe.sh" cp "$S/deploy-cache" "$SH" "$id" ;;
                rs) timed "inc.rs.$mode" "$HERE/recipe.sh" rsync "$S/deploy-cache" "$RS" "$id" "$prev_rs" ;;
                # Not a contender: the floor of any design that makes each release a
                # tree of hard links (one mkdir per directory, one link per file), on a
                # copy of the base release (same tree).
                al)
                    timed "inc.al.$mode" cp -al "$W/floor-src" "$W/cp-al"
                    bury "$W/cp-al"
                    ;;
                esac
            done
            prev_rs=$id
        done
        linked=$(grep -o '"linked":[0-9]*' "$W/cmd.log" | tail -1 | cut -d: -f2)
        rk=$(med_wall "inc.rk.$mode") sh=$(med_wall "inc.sh.$mode") rs=$(med_wall "inc.rs.$mode")
        q=$(ratio "$rk" "$sh") q2=$(ratio "$rk" "$rs")
        row "2. incremental, ${CHANGED} changed ($mode)" "${rk} s (cpu $(med_cpu "inc.rk.$mode") s; ${linked} linked)" \
            "cp recipe ${sh} s (cpu $(med_cpu "inc.sh.$mode") s)" "$q" "<= 0.1" "$(verdict le "$q" 0.1)"
        row "2. incremental, ${CHANGED} changed ($mode)" "${rk} s" \
            "rsync --link-dest recipe ${rs} s (cpu $(med_cpu "inc.rs.$mode") s)" "$q2" "< 1" "$(verdict lt "$q2" 1)"
        al=$(med_wall "inc.al.$mode")
        row "2. (reference, $mode) hard-link floor" "-" \
            "\`cp -al\` of the release tree ${al} s (cpu $(med_cpu "inc.al.$mode") s)" "$(ratio "$al" "$sh") of the cp recipe" "-" "info"
        # Where the floor itself is above 0.1 of the recipe (a machine whose metadata
        # operations are slow next to its copies), no hard-link tree can meet that target;
        # this row tells whether the keeper is at the floor there.
        row "2. (reference, $mode) release-keeper vs the floor" "${rk} s" \
            "\`cp -al\` ${al} s" "$(ratio "$rk" "$al")" "-" "info"
    done
fi
# The big trees are not needed any more.
if want full || want inc; then
    bury "$S" "$SH" "$RS" "$W/floor-src"
fi

# --- 3. marker-to-swap latency -------------------------------------------------------------------
if want lat; then
    # The recipes' last trees (hundreds of MB, never synced by them) would otherwise be
    # written back during the first uploads and show as outliers of a few hundred ms.
    sync
    log "latency: $LAT_ITER uploads of $LAT_FILES files to the running service (load $(loadavg))"
    python3 "$HERE/latency.py" "$RK" "$W/lat" --iterations "$LAT_ITER" --files "$LAT_FILES" \
        --out "$W/lat.txt"
    lat=$(median $(cut -d' ' -f1 "$W/lat.txt"))
    lat_log=$(median $(cut -d' ' -f2 "$W/lat.txt"))
    lat_min=$(sort -g "$W/lat.txt" | head -1 | cut -d' ' -f1)
    lat_max=$(sort -g "$W/lat.txt" | tail -1 | cut -d' ' -f1)
    wake=$(median $(cut -d' ' -f3 "$W/lat.txt"))
    build=$(median $(cut -d' ' -f4 "$W/lat.txt"))
    act=$(median $(cut -d' ' -f5 "$W/lat.txt"))
    row "3. marker close -> current swapped, ${LAT_FILES} files (median of $(wc -l <"$W/lat.txt"))" \
        "${lat} ms (min ${lat_min}, max ${lat_max}; by the log ${lat_log} ms; log medians: marker to upload.detected ${wake}, to release.finalized ${build}, to release.activated ${act})" \
        "-" "-" "< 50 ms" "$(verdict lt "$lat" 50)"
fi

# --- 4. peak RSS ------------------------------------------------------------------------------
if want rss; then
    reap_graveyard_bg # not timed from here on: delete in the background
    log "peak RSS: generating $RSS_FILES files"
    mkdir -p "$W/rss"
    python3 "$HERE/gen.py" tree "$W/rss/deploy-cache" --files "$RSS_FILES" --bytes "$RSS_BYTES" --seed 3
    "$RK" --config "$CFG" init rss >/dev/null
    # peak_rss ID LABEL: finalizes release ID of the rss site under /usr/bin/time and adds
    # the row LABEL with its peak RSS.
    peak_rss() {
        local t0 t1 kib mib linked
        prep warm "$W/rss/deploy-cache"
        log "peak RSS: $2 (load $(loadavg))"
        t0=$EPOCHREALTIME
        /usr/bin/time -v -o "$W/rss.$1.time" "$RK" --config "$CFG" --log-format json finalize rss --id "$1" \
            >>"$W/cmd.log" 2>&1 || { tail "$W/cmd.log" >&2; die "finalize $1 of the big tree failed"; }
        t1=$EPOCHREALTIME
        kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$W/rss.$1.time")
        mib=$(echo "scale=1; $kib / 1024" | bc)
        linked=$(grep -o '"linked":[0-9]*' "$W/cmd.log" | tail -1 | cut -d: -f2)
        row "4. peak RSS, $2" "${mib} MiB (${kib} KiB; ${linked} linked; took $(printf %.1f "$(echo "$t1 - $t0" | bc)") s)" \
            "-" "-" "< 64 MB (62,500 KiB)" "$(verdict lt "$kib" 62500)"
    }
    peak_rss big "finalize of ${RSS_FILES} files"
    # The next release of the same tree also reads the hash cache and the previous
    # release's manifest: memory must stay flat there too.
    python3 "$HERE/gen.py" mutate "$W/rss/deploy-cache" --fraction "$CHANGED" --seed 4 2>>"$W/cmd.log"
    peak_rss big2 "next release of the same ${RSS_FILES} files"
    bury "$W/rss"
fi

# --- 5. idle CPU --------------------------------------------------------------------------------
if want idle; then
    root=$W/idle
    [[ -d $W/lat ]] && root=$W/lat # a site with releases, as in production
    reap_graveyard_bg # deleting other trees does not concern the idle site
    log "idle CPU: service on $root for 5 + $IDLE_SECS s"
    "$RK" run --root "$root" --log-format json 2>"$W/idle.log" &
    SERVICE_PID=$!
    for _ in $(seq 100); do
        grep -q '"daemon.started"' "$W/idle.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q '"daemon.started"' "$W/idle.log" || die "idle service did not start"
    ticks() { awk '{print $14 + $15}' "/proc/$SERVICE_PID/stat"; }
    sleep 5
    a=$(ticks)
    sleep "$IDLE_SECS"
    b=$(ticks)
    kill -TERM "$SERVICE_PID"
    wait "$SERVICE_PID" || true
    SERVICE_PID=
    row "5. CPU of the idle service over ${IDLE_SECS} s" \
        "$((b - a)) ticks (start-up: ${a} ticks; 1 tick = 1/$(getconf CLK_TCK) s)" "-" "-" "0 ticks" \
        "$(verdict test $((b - a)) -eq 0)"
fi

# --- report ----------------------------------------------------------------------------------
elapsed=$(printf %.0f "$(echo "$EPOCHREALTIME - $BENCH_START" | bc)")
{
    echo
    echo "## release-keeper vs the shell recipe (bench/compare.sh)"
    echo
    echo "release-keeper: $RK, built $BIN_DATE (repo HEAD: $REV)."
    echo "Machine: $(nproc) CPUs, ${CPU_MODEL}, ${MEM} RAM, kernel $(uname -r); work dir on ${FSTYPE} (${DEV})."
    if want full || want inc; then
        echo "Tree: ${FILES} files, ${TREE_DIRS} dirs, ${TREE_BYTES} bytes on disk (du -sb); ${CHANGED} of the files changed per incremental release."
    fi
    echo "Median of ${RUNS} runs; warm = upload in the page cache$([[ $COLD == 1 ]] && echo ', cold = caches dropped before each run'). Wall time (CPU time = user + sys)."
    echo "Load average: ${LOAD_START} at start, $(loadavg) at end. Run time: ${elapsed} s."
    echo
    echo "| measurement | release-keeper | baseline | ratio | target | result |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Raw runs (wall s, cpu s):"
    for f in "$W"/t.*; do
        [[ -e $f ]] && echo "- ${f##*/t.}: $(tr '\n' ';' <"$f" | sed 's/;$//; s/;/; /g')"
    done
    if [[ -s $W/lat.txt ]]; then
        echo "- latency ms (inotify): $(cut -d' ' -f1 "$W/lat.txt" | tr '\n' ' ')"
    fi
} | tee "${BENCH_RESULTS:-/dev/null}"
