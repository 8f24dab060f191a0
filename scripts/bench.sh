#!/usr/bin/env bash
# bitfog against nginx+curl, rsync, rclone, find, openssl and sha256sum, one
# table from one run (medians, ratios from alternating runs). Run by hand:
#   scripts/bench.sh            # full size: 2 GiB, 50,000, 300,000 and 1,000,000 files
#   scripts/bench.sh --quick    # small data, to check the script
#   scripts/bench.sh --only delta   # just deltas against rdiff and rsync batches
#   scripts/bench.sh --only ssh     # just ssh:// fetch and store against rsync -e ssh (a private sshd)
#   scripts/bench.sh --only disks   # fetch onto exFAT, FAT32 and NTFS couriers (root) against a plain copy
#   scripts/bench.sh --only crypt   # an encrypted courier (1 GiB fetch and store) against a plain one
#   scripts/bench.sh --only goals   # the performance goals: rsync, curl -o from bitfog serve, find
#                                   # (also on a machine where nothing installs: scripts/device-pack.sh)
#   BENCH_SLOW=1 scripts/bench.sh   # also rclone webdav for the small-file store
# Needs about 8 GB of free disk (BENCH_DIR picks where); traffic stays on
# 127.0.0.1; every server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in nginx:nginx-light rsync:rsync rclone:rclone curl:curl openssl:openssl rdiff:rdiff ssh:openssh-client /usr/sbin/sshd:openssh-server \
    mkfs.exfat:exfatprogs mount.exfat-fuse:exfat-fuse mkfs.vfat:dosfstools fusefat:fusefat ntfs-3g:ntfs-3g; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --quiet
# Run a copy, so a rebuild during the run does not change the binary.
bin=$(mktemp "${TMPDIR:-/tmp}/bitfog-bench-bin.XXXXXX")
trap 'rm -f "$bin"' EXIT
cp target/release/bitfog "$bin" && chmod 755 "$bin"
python3 scripts/bench.py "$bin" "$@"
