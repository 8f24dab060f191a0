#!/usr/bin/env bash
# Hostile input and faults against the real binary, with figures:
#   scripts/torture.sh                 # every section, 100 rounds each
#   scripts/torture.sh requests        # one section
#   scripts/torture.sh fetch --rounds 20
#   scripts/torture.sh delta           # kill -9 while deltas are made and applied
# Run by hand; traffic goes to 127.0.0.1 only, files to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec python3 scripts/torture.py "$PWD/target/release/bitfog" "$@"
