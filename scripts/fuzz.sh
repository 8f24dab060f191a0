#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60 s each) with
# cargo-fuzz on the nightly toolchain, then prints one line per target.
#   scripts/fuzz.sh            # every target, 60 s each
#   scripts/fuzz.sh 300 head   # one target, 5 minutes
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(range paths manifest head delta age)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
    log=$(mktemp)
    if cargo +nightly fuzz run "$t" -- -max_total_time="$secs" >"$log" 2>&1; then
        verdict="ok"
    else
        verdict="CRASH (see fuzz/artifacts/$t/)"
    fi
    runs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
    printf '%-10s %ss  %s runs  %s  %s\n' "$t" "$secs" "${runs:-?}" "${cov:-}" "$verdict"
    rm -f "$log"
done
