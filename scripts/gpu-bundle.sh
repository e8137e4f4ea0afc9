#!/usr/bin/env bash
# Packs what a short-lived GPU machine needs, built beforehand on a machine with the toolchain:
# a release binary with the wgpu and cuda backends (stripped), the configs, the Shakespeare
# tokenizer and corpus, scripts/pytorch_train_bench.py, and gpu-check.sh at the top, into one
# tar.xz of at most 60 MiB. On the GPU machine, with no toolchain and no network:
#   tar xf distillery-gpu.tar.xz && distillery-gpu/gpu-check.sh
# and on any machine without a GPU, to check the bundle itself:
#   distillery-gpu/gpu-check.sh --cpu-only
#
# LibTorch CUDA (tch-cuda) is left out: its libraries alone are over 2 GB.
#
# Usage: scripts/gpu-bundle.sh [OUT]   (default: dist/distillery-gpu.tar.xz)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$repo/dist/distillery-gpu.tar.xz}")"
limit_mib=60
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

cd "$repo"
scripts/setup-llvm.sh
cargo build --release --features cuda
binary="$target_dir/release/distillery"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/distillery-gpu"
mkdir -p "$stage/bin" "$stage/datasets" "$stage/scripts"
objcopy --strip-all "$binary" "$stage/bin/distillery"
cp -r configs "$stage/"
cp datasets/tinyshakespeare.txt datasets/shakespeare-bpe-2048.json "$stage/datasets/"
cp scripts/gpu-check.sh "$stage/"
cp scripts/pytorch_train_bench.py "$stage/scripts/"
{
    echo "distillery $(git describe --always --dirty), features wgpu cuda"
    rustc --version
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
} >"$stage/VERSION"

# The binary runs only where its shared libraries are: say which, so that a GPU image missing
# one is recognised at once rather than by a loader error.
ldd "$stage/bin/distillery" | awk '{ print $1 }' | sort >"$stage/SHARED-LIBRARIES"
"$stage/bin/distillery" --version >/dev/null

mkdir -p "$(dirname "$out")"
tar -C "$work" -cf - distillery-gpu | xz -9e -T0 >"$out.partial"
size=$(stat -c %s "$out.partial")
if ((size > limit_mib * 1024 * 1024)); then
    rm -f "$out.partial"
    echo "gpu-bundle.sh: the bundle is $((size / 1024 / 1024)) MiB, over the $limit_mib MiB limit" >&2
    exit 1
fi
mv "$out.partial" "$out"
echo "wrote $out ($(awk -v bytes="$size" 'BEGIN { printf "%.1f", bytes / 1048576 }') MiB):"
tar -tvf "$out" | awk '{ printf "  %10d  %s\n", $3, $6 }'
