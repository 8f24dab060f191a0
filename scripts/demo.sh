#!/usr/bin/env bash
# A complete two-site trip on this machine: builds the release binary,
# starts a source and a destination server on 127.0.0.1 with generated
# sample data in a temporary directory, carries everything across in two
# budget-limited hops, then a changed image as a delta in a third, checks
# that the trees are equal, stops its servers.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
bin=$PWD/target/release/bitfog
work=$(mktemp -d "${TMPDIR:-/tmp}/bitfog-demo.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }

say "sample data in $work/source"
mkdir -p "$work/source" "$work/dest" "$work/courier"
for d in images/2024 images/2025 "logs/site a" docs; do mkdir -p "$work/source/$d"; done
head -c $((24 << 20)) /dev/urandom >"$work/source/images/2024/vm-disk.img"
head -c $((12 << 20)) /dev/urandom >"$work/source/images/2025/vm-disk.img"
for i in $(seq 1 200); do
    head -c $((RANDOM % 60000 + 1)) /dev/urandom >"$work/source/logs/site a/log-$i.txt"
done
printf 'read me\n' >"$work/source/docs/README"
mkdir -p "$work/source/docs/drafts" # an empty directory travels too
: >"$work/source/docs/empty"
printf 'caf\xc3\xa9\n' >"$work/source/docs/"$'caf\xc3\xa9.txt'
chmod 600 "$work/source/docs/README"
ln -s ../images/2025/vm-disk.img "$work/source/docs/latest.img"
du -sh "$work/source" | cut -f1 | sed 's/^/total: /'

start() { # NAME CONFIG-JSON: starts a server, sets $url to its base URL
    local conf=$work/$1.json log=$work/$1.log
    printf '%s\n' "$2" >"$conf"
    "$bin" serve --conf "$conf" --addr 127.0.0.1:0 --cache "$work/$1.cache" >/dev/null 2>"$log" &
    pids+=($!)
    for _ in $(seq 200); do grep -q listening "$log" 2>/dev/null && break; sleep 0.05; done
    url=$(sed -n 's/^bitfog: listening on //p' "$log" | head -1)
    [ -n "$url" ] || { cat "$log" >&2; exit 1; }
}
start source "{\"vms\": {\"path\": \"$work/source\"}}"
src=${url}vms/
start dest "{\"vms\": {\"path\": \"$work/dest\", \"writable\": true}}"
dst=${url}vms/
echo "source site: $src"
echo "destination site: $dst"

cd "$work"
say "at the destination: it holds nothing yet"
"$bin" emptydb dest.db
say "at the source: how many trips of 30M?"
"$bin" plan dest.db "$src" --max-bytes 30M
destdb=dest.db
for hop in 1 2; do
    say "hop $hop, at the source: fetch what the destination lacks (budget 30M)"
    "$bin" builddb "$src" vms.db
    "$bin" fetch "$destdb" "$src" courier --max-bytes 30M
    say "hop $hop, at the destination: store (it leaves its receipt in the courier)"
    "$bin" store vms.db "$dst" courier
    destdb=courier # the next fetch reads the receipt: no builddb to forget
done

say "the 24 MiB image changes a little at the source (64 KiB overwritten)"
dd if=/dev/urandom of=source/images/2024/vm-disk.img bs=64K count=1 seek=100 conv=notrunc status=none
say "hop 3, at the destination: a snapshot with block signatures of large files"
"$bin" builddb "$dst" dest.db --signatures --signature-min 16M
say "hop 3, at the source: only a delta of the image travels"
"$bin" builddb "$src" vms.db
"$bin" fetch dest.db "$src" courier --max-bytes 30M
say "hop 3, at the destination: the server patches the image and checks it"
"$bin" store vms.db "$dst" courier

say "what is left to carry"
"$bin" plan courier "$src"
if diff -r --no-dereference source dest >/dev/null; then
    say "the trees are equal: every byte verified with SHA-256"
else
    diff -r --no-dereference source dest || true
    echo "demo: the trees differ" >&2
    exit 1
fi
