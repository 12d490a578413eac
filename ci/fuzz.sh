#!/usr/bin/env bash
# ci/fuzz.sh: build the cargo-fuzz targets of fuzz/ and run each of them for
# a bounded time (default) or a bounded number of executions (--long), with
# AddressSanitizer and leak detection; fails on any crash, leak, timeout or
# out-of-memory of any target.
#
# Run it:   bash ci/fuzz.sh            # CI: every target ~20 s (FUZZ_SECONDS)
#           bash ci/fuzz.sh --long     # 10 M executions per target (FUZZ_RUNS)
#           FUZZ_TARGETS="request chain" bash ci/fuzz.sh
#
# It installs what it needs when missing: a C++ compiler (libFuzzer is C++,
# built by libfuzzer-sys through the cc crate) with apt-get, and cargo-fuzz
# (pinned, $CARGO_FUZZ_VERSION) into ~/.cargo/bin with `cargo install`.
#
# Stable Rust only: cargo-fuzz passes nightly-only flags to rustc
# (-Zsanitizer=address, and cargo's -Z options). RUSTC_BOOTSTRAP=1 is the
# supported switch that lets a stable toolchain accept them; it is set for
# the fuzz build only (fuzz/ is a workspace of its own), never for the
# project's own builds. No nightly toolchain is needed or fetched.
#
# Each target's corpus grows in fuzz/corpus/TARGET (ignored by git), seeded
# from fuzz/seeds/TARGET when that exists; libFuzzer's output goes to
# fuzz/target/logs/TARGET.log, a crash or leak input to fuzz/artifacts/TARGET/.
# One line per target tells executions, exec/s, coverage, features, corpus
# size, peak RSS and time; the last line is `fuzz: N targets passed` or
# `fuzz: M of N targets failed: ...`.
#
# Knobs (environment):
#   FUZZ_SECONDS   seconds per target in the default mode (default 20)
#   FUZZ_RUNS      executions per target with --long (default 10000000)
#   FUZZ_TARGETS   the targets to run (default: all, `cargo fuzz list`)
#   FUZZ_MAX_LEN   largest input, in bytes, for every target (default: per
#                  target, below)
#   FUZZ_NICE      niceness of builds and runs (default 10)

set -euo pipefail
shopt -s inherit_errexit

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
FUZZ_RUNS="${FUZZ_RUNS:-10000000}"
FUZZ_NICE="${FUZZ_NICE:-10}"
mode=short
case "${1:-}" in
--long) mode=long ;;
"") ;;
*)
    echo "usage: bash ci/fuzz.sh [--long]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."
root="$PWD"
log() { printf '[fuzz] %s\n' "$*" >&2; }
die() {
    printf '[fuzz] ERROR: %s\n' "$*" >&2
    exit 1
}

# --- prerequisites ---------------------------------------------------------

missing=()
command -v c++ >/dev/null || missing+=(g++)
command -v cc >/dev/null || missing+=(gcc)
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || die "missing host packages (${missing[*]}); run as root or install them"
    log "installing host packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -qq update || log "apt-get update had errors; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    nice -n "$FUZZ_NICE" cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# --- build -----------------------------------------------------------------

export RUSTC_BOOTSTRAP=1
# Always fuzz/target, even when the caller set CARGO_TARGET_DIR for the
# project's builds: these are built with other flags (AddressSanitizer),
# and a shared directory would rebuild one or the other each time.
export CARGO_TARGET_DIR="$root/fuzz/target"
cd "$root/fuzz"
log "building the fuzz targets (release, debug assertions, AddressSanitizer)"
nice -n "$FUZZ_NICE" cargo fuzz build
bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"
((${#targets[@]})) || die "no fuzz targets"

# --- run -------------------------------------------------------------------

# As `cargo fuzz run` sets them: leaks are errors; ODR checking is off (it
# reports SQLite's function-local static tables, which are not violations).
export ASAN_OPTIONS="detect_leaks=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
mkdir -p "$root/fuzz/target/logs"
case $mode in
short) limit=(-max_total_time="$FUZZ_SECONDS") ;;
long) limit=(-runs="$FUZZ_RUNS") ;;
esac
log "$mode run of ${#targets[@]} targets: ${limit[*]}"

# Largest input per target: room for what the target's input can say
# (a command line, a few dozen requests or steps, a page table's worth of
# entries) and no more: with libFuzzer's 4096 for all, the executions per
# second of most targets fell 2-5 times as their corpora filled with long
# inputs, which say nothing a shorter one cannot.
max_len_of() {
    case $1 in
    endpoints) echo 256 ;;
    viot) echo 512 ;;
    chain | control_decode) echo 4096 ;;
    *) echo 1024 ;;
    esac
}

# libFuzzer's final statistics: one line per target.
summary() {
    local t="$1" logf="$2" secs="$3"
    local runs eps rss done_line cov ft corp
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logf" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logf" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$logf" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$logf" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
    corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$done_line")
    printf '%-16s runs %10s  exec/s %7s  cov %5s  ft %6s  corpus %-12s rss %5s MB  %5s s\n' \
        "$t" "${runs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?}" "$secs"
}

failed=()
for t in "${targets[@]}"; do
    [[ -x "$bin_dir/$t" ]] || die "no fuzz target $t (cargo fuzz list)"
    corpus="$root/fuzz/corpus/$t"
    artifacts="$root/fuzz/artifacts/$t"
    logf="$root/fuzz/target/logs/$t.log"
    mkdir -p "$corpus" "$artifacts"
    extra=()
    [[ -d "$root/fuzz/seeds/$t" ]] && extra+=("$root/fuzz/seeds/$t")
    [[ -f "$root/fuzz/dict/$t.dict" ]] && limit_dict=(-dict="$root/fuzz/dict/$t.dict") || limit_dict=()
    start=$EPOCHSECONDS
    status=0
    nice -n "$FUZZ_NICE" "$bin_dir/$t" "${limit[@]}" "${limit_dict[@]}" \
        -max_len="${FUZZ_MAX_LEN:-$(max_len_of "$t")}" \
        -detect_leaks=1 -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus" "${extra[@]}" >"$logf" 2>&1 || status=$?
    summary "$t" "$logf" "$((EPOCHSECONDS - start))"
    if ((status != 0)); then
        failed+=("$t")
        log "$t failed (status $status); end of $logf:"
        tail -n 40 "$logf" >&2
        log "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $t fuzz/artifacts/$t/<file> (in fuzz/)"
    fi
done

if ((${#failed[@]})); then
    echo "fuzz: ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets passed"
