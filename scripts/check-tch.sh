#!/usr/bin/env bash
# Builds distillery with burn's LibTorch backend (`--features tch`) against the CPU libtorch
# 2.9.0 that scripts/setup-libtorch.sh assembles from PyPI, and runs the cross-backend test
# (tests/backends.rs) on tch-cpu and wgpu, each against the cpu backend.
#
# Usage: scripts/check-tch.sh   (first run: ~900 MB download, ~20 min build on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

# An assignment, not `eval "$(...)"`, so that a failed setup stops the script.
environment="$(scripts/setup-libtorch.sh)"
eval "$environment"
echo "LIBTORCH=$LIBTORCH" >&2
cargo test --release -p distillery-cli --features tch --test backends -- --test-threads=1 --nocapture
