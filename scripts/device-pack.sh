#!/usr/bin/env bash
# Packs what `scripts/bench.py --only goals` needs on a machine where
# nothing can be installed (the 16-core machine: curl, python3 and
# openssl are there, rsync is not) into target/device/ (ignored by git):
#   bin/bitfog   a release build linked statically (glibc crt-static, so
#                the far machine's C library does not matter)
#   bin/rsync    a wrapper that runs this machine's rsync through its own
#                dynamic loader and libraries (lib/), C library included
# Then, on that machine, from the repository root:
#   PATH=$PWD/target/device/bin:$PATH python3 scripts/bench.py target/device/bin/bitfog --only goals
# Prints the folder's size (what travels must stay under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v rsync >/dev/null || { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; }
out=target/device
rm -rf "$out" && mkdir -p "$out/bin" "$out/lib"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
    --target x86_64-unknown-linux-gnu --target-dir target/device-build
cp target/device-build/x86_64-unknown-linux-gnu/release/bitfog "$out/bin/bitfog"
strip "$out/bin/bitfog" 2>/dev/null || true
cp "$(command -v rsync)" "$out/lib/rsync"
# Every library rsync loads, the loader and the C library included.
ldd "$out/lib/rsync" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r so; do
    cp -L "$so" "$out/lib/"
done
loader=$(cd "$out/lib" && ls ld-linux-*.so.* | head -1)
cat >"$out/bin/rsync" <<EOF
#!/bin/sh
# This machine's rsync with the libraries it was built against.
lib=\$(dirname "\$0")/../lib
exec "\$lib/$loader" --library-path "\$lib" "\$lib/rsync" "\$@"
EOF
chmod 755 "$out/bin/rsync"
v=$("$out/bin/rsync" --version) && echo "${v%%$'\n'*}"
"$out/bin/bitfog" --version
file "$out/bin/bitfog" 2>/dev/null | cut -d, -f1-2 || true
du -sh "$out" | cut -f1 | sed 's/^/size: /'
