#!/usr/bin/env bash
# Build every cargo-fuzz target and fuzz each for SECONDS (default 20), starting from the
# committed seed corpus (copied to a temp dir, so fuzz/corpus/ does not grow), after replaying
# any recorded crashes in fuzz/regressions/<target>/. Exits non-zero on any crash, timeout,
# OOM or build failure. Works from any cwd; used by .ci/run on a clean machine.
#
#   fuzz/run.sh [SECONDS]
#
# Environment: FUZZ_TARGETS="a b" to run only some targets; FUZZ_SANITIZER (default address).
set -euo pipefail

secs="${1:-20}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir"

# cargo-fuzz passes -Z flags to rustc; stable rustc accepts them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
sanitizer="${FUZZ_SANITIZER:-address}"
# Same flags for build and run, so `cargo fuzz run` does not rebuild. Debug assertions on:
# integer overflow in weir code is a finding.
flags=(--sanitizer "$sanitizer" --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

start=$(date +%s)
echo "fuzz: building ($(cargo fuzz --version), sanitizer $sanitizer)" >&2
cargo fuzz build "${flags[@]}"
echo "fuzz: build took $(($(date +%s) - start))s" >&2

work="$(mktemp -d "${TMPDIR:-/tmp}/weir-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The panic message (which libFuzzer's long stack trace would push out of view), then the tail.
show_failure() {
    grep -A 6 -m 1 'panicked at' "$1" >&2 || true
    tail -n 25 "$1" >&2
}

summary=()
failed=0
for t in $targets; do
    log="$work/$t.log"
    artifacts="$fuzz_dir/artifacts/$t"
    mkdir -p "$artifacts"

    # 1. Recorded crashes must not crash any more.
    reg="$fuzz_dir/regressions/$t"
    if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
        if ! cargo fuzz run "${flags[@]}" "$t" "$reg"/* -- -runs=1 >"$log.reg" 2>&1; then
            show_failure "$log.reg"
            summary+=("$t: FAIL, a recorded input in fuzz/regressions/$t/ still crashes (log above)")
            failed=1
            continue
        fi
    fi

    # 2. Fuzz from a throwaway copy of the seed corpus.
    corpus="$work/corpus-$t"
    mkdir -p "$corpus"
    if [ -d "corpus/$t" ]; then
        find "corpus/$t" -maxdepth 1 -type f -exec cp {} "$corpus/" \;
    fi
    seeds=$(find "$corpus" -type f | wc -l)
    t0=$(date +%s)
    set +e
    cargo fuzz run "${flags[@]}" "$t" "$corpus" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - t0))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*')
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*')
    units=$(find "$corpus" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        summary+=("$t: ok, ${runs:-?} runs in ${took}s, cov ${cov:-?} ft ${ft:-?}, corpus $seeds -> $units")
    else
        show_failure "$log"
        crash=$(grep -o "Test unit written to .*" "$log" | tail -n 1 | sed 's/Test unit written to //')
        summary+=("$t: FAIL (exit $rc) after ${took}s, input: ${crash:-see log above}")
        failed=1
    fi
done

echo "fuzz: total $(($(date +%s) - start))s, ${secs}s per target"
for line in "${summary[@]}"; do
    echo "fuzz: $line"
done
exit "$failed"
