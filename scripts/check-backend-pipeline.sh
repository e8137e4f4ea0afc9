#!/usr/bin/env bash
# Runs every stage of the quickstart pipeline (train, distill, quantize int8/RTN/GPTQ, export,
# eval with decoding speed, report) on one backend, shortened to STEPS training steps per model,
# in a scratch directory that is deleted afterwards. It checks that each stage works on the
# backend, not the models' quality.
#
# Usage: scripts/check-backend-pipeline.sh BACKEND [STEPS]   e.g. wgpu 20, or tch-cpu 20
#   DISTILLERY=path/to/distillery picks the binary (default: the release build in
#   $CARGO_TARGET_DIR or target/; tch-* backends need one built with --features tch, as
#   scripts/check-tch.sh leaves it). The shipped token caches in datasets/ are used and, if
#   missing, written there.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
backend="${1:?usage: scripts/check-backend-pipeline.sh BACKEND [STEPS]}"
steps="${2:-20}"
binary="$(realpath "${DISTILLERY:-${CARGO_TARGET_DIR:-$repo/target}/release/distillery}")"

if [[ "$backend" == tch-* ]]; then
    # An assignment, not `eval "$(...)"`, so that a failed setup stops the script.
    environment="$("$repo/scripts/setup-libtorch.sh")"
    eval "$environment"
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
ln -s "$repo/configs" "$repo/datasets" "$scratch/"
cd "$scratch"

started=$SECONDS
"$binary" pipeline configs/quickstart.toml \
    --set "run.backend=$backend" \
    --set "train.steps=$steps" \
    --set train.warmup_steps=2 \
    --set "eval.every=$steps" \
    --set eval.max_windows=16 \
    --set "checkpoint.every=$steps" \
    --set "log.every=$steps"
echo "every quickstart stage ran on $backend in $((SECONDS - started)) s:"
cat experiments/quickstart/models.md
ls notebooks-export/quickstart/
