#!/usr/bin/env bash
# A whole loopback trip with one binary, run under qemu-user when it is
# for another processor: serve (two areas), builddb, fetch under a budget,
# store, then the trees must be equal. Prints the time and SHA-256 speed.
#   scripts/qemu-trip.sh target/aarch64-unknown-linux-musl/release/bitfog
set -euo pipefail
bin=$(realpath "$1")
case $(file -b "$bin") in
    *aarch64*) run=(qemu-aarch64-static "$bin") ;;
    *ARM*) run=(qemu-arm-static "$bin") ;;
    *) run=("$bin") ;;
esac
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/src/d/e" "$work/dst"
head -c 3000000 /dev/urandom >"$work/src/big"
for i in $(seq 20); do head -c $((i * 997)) /dev/urandom >"$work/src/d/e/f$i"; done
printf 'x' >"$work/src/d/tiny"
ln -s d/tiny "$work/src/link"
printf '{"src":{"path":"%s"},"dst":{"path":"%s","writable":true}}' "$work/src" "$work/dst" >"$work/c.json"
"${run[@]}" serve --conf "$work/c.json" --addr 127.0.0.1:0 --cache "$work/cache" 2>"$work/log" >/dev/null &
server=$!
for _ in $(seq 100); do grep -q listening "$work/log" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's#^bitfog: listening on \(http://.*/\)$#\1#p' "$work/log")
start=$(date +%s.%N)
"${run[@]}" emptydb "$work/dest.db" -q >/dev/null
"${run[@]}" builddb "${url}src/" "$work/src.db" -q >/dev/null
for _ in 1 2 3; do
    "${run[@]}" fetch "$work/dest.db" "${url}src/" "$work/courier" --max-bytes 2M -q >/dev/null
    "${run[@]}" store "$work/src.db" "${url}dst/" "$work/courier" -q >/dev/null
    "${run[@]}" builddb "${url}dst/" "$work/dest.db" -q >/dev/null
done
end=$(date +%s.%N)
if ! diff -r --no-dereference "$work/src" "$work/dst"; then
    echo "qemu trip: the trees differ" >&2
    exit 1
fi
printf 'qemu trip with %s: equal trees in %.1f s\n' "$(file -b "$bin" | cut -d, -f2)" "$(echo "$end - $start" | bc)"
