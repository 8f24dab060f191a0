#!/usr/bin/env bash
# Builds one static Linux binary and checks it:
#   scripts/build-static.sh            # x86_64 (musl when rustup has it, else glibc crt-static)
#   scripts/build-static.sh aarch64    # aarch64 musl, cross-compiled; checked under qemu
#   scripts/build-static.sh aarch64 --trip   # and a whole loopback trip with it
#   scripts/build-static.sh armv7      # 32-bit ARM (glibc, linked statically:
#                                      # no armv7 musl std is installable here)
# Prints `file` output, the size and --version (under qemu-aarch64-static
# when the binary is for another processor).
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-x86_64}
trip=${2:-}

# shellcheck disable=SC2086 # $2 may name several packages
need() { command -v "$1" >/dev/null || { apt-get update -qq && apt-get install -y -qq $2 >/dev/null; }; }
need file file

case $arch in
    x86_64)
        if rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
            # ring (rustls' crypto) compiles C for the target.
            need musl-gcc musl-tools
            target=x86_64-unknown-linux-musl
            CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --target "$target"
        else
            target=x86_64-unknown-linux-gnu
            RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$target"
        fi
        run=()
        ;;
    aarch64)
        target=aarch64-unknown-linux-musl
        rustup target add "$target" >/dev/null
        # A C cross compiler for ring, which also links.
        need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
        need qemu-aarch64-static qemu-user-static
        CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
            cargo build --release --target "$target"
        run=(qemu-aarch64-static)
        ;;
    armv7)
        target=armv7-unknown-linux-gnueabihf
        rustup target add "$target" >/dev/null
        need arm-linux-gnueabihf-gcc "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross"
        need qemu-arm-static qemu-user-static
        # glibc linked in whole: one file that runs on any armv7 Linux.
        # (bitfog resolves names itself only through getaddrinfo, which
        # static glibc serves from /etc/hosts and DNS.)
        RUSTFLAGS="-C target-feature=+crt-static" \
            CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc \
            CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc \
            cargo build --release --target "$target"
        run=(qemu-arm-static)
        ;;
    *)
        echo "build-static.sh: '$arch': x86_64, aarch64 or armv7" >&2
        exit 2
        ;;
esac
bin=target/$target/release/bitfog
file "$bin"
printf 'size: %s bytes (%s)\n' "$(stat -c %s "$bin")" "$(du -h "$bin" | cut -f1)"
"${run[@]}" "$bin" --version
if [ "$trip" = --trip ]; then
    need bc bc
    scripts/qemu-trip.sh "$bin"
fi
