#!/usr/bin/env bash
# Builds a static x86_64 Linux binary: the musl target when rustup has it,
# else glibc with crt-static. Prints `file` output and size, runs --version.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need file file

if rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
    # ring (rustls' crypto) compiles C for the target.
    need musl-gcc musl-tools
    target=x86_64-unknown-linux-musl
    CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --target "$target"
else
    target=x86_64-unknown-linux-gnu
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$target"
fi
bin=target/$target/release/bitfog
file "$bin"
printf 'size: %s bytes (%s)\n' "$(stat -c %s "$bin")" "$(du -h "$bin" | cut -f1)"
"$bin" --version
