#!/usr/bin/env bash
# Checks and measures a GPU machine with the unpacked GPU bundle (scripts/gpu-bundle.sh makes
# it): no toolchain, no network. Every step has its own time limit, and the whole check stops
# starting steps after --budget seconds (default 290), so it ends within 5 minutes. A failed
# step is named, and the check goes on to the next one. The figures go to one JSON file.
#
# Steps: the devices (nvidia-smi, `distillery devices`); `distillery bench backend` for cuda
# and wgpu against the cpu backend (the tiny model's logits, then one training step's losses
# and weights); `distillery bench train` at the quickstart teacher's shape and at a ~102M
# shape (configs/bench-100m.toml) in f32 and bf16, with scripts/pytorch_train_bench.py on the
# same shapes where PyTorch sees the GPU; `distillery bench generate` of SmolLM2-135M as a float
# model where its GGUF file is present (SMOLLM2=path, or models/ beside this script).
#
# --cpu-only runs the steps a machine without a GPU can: the devices, wgpu on whatever adapter
# it has (Mesa's lavapipe on a CPU) against cpu, `bench train` on cpu and `bench generate` on
# cpu.
#
# Usage: ./gpu-check.sh [--cpu-only] [--out FILE] [--budget SECONDS]
set -uo pipefail

bundle="$(cd "$(dirname "$0")" && pwd)"
distillery="$bundle/bin/distillery"
cpu_only=false
out="$PWD/gpu-check.json"
budget=290
while (($#)); do
    case "$1" in
        --cpu-only) cpu_only=true ;;
        --out) out="$(realpath -m "$2")"; shift ;;
        --budget) budget="$2"; shift ;;
        *)
            echo "usage: $0 [--cpu-only] [--out FILE] [--budget SECONDS]" >&2
            exit 2
            ;;
    esac
    shift
done

# The steps run in a scratch directory holding links to the bundle's configs and data, so
# that token caches and run outputs never land in the bundle.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
ln -s "$bundle/configs" "$bundle/datasets" "$scratch/"
mkdir -p "$scratch/steps"
cd "$scratch" || exit 1
# Mesa's window-system code complains on every start without one; nothing else uses it.
if [[ -z "${XDG_RUNTIME_DIR:-}" ]]; then
    export XDG_RUNTIME_DIR="$scratch/runtime"
    mkdir -m 700 "$XDG_RUNTIME_DIR"
fi

started=$SECONDS
records=()
failures=0

json_string() {
    local text="$1"
    text="${text//\\/\\\\}"
    text="${text//\"/\\\"}"
    text="${text//$'\n'/\\n}"
    text="${text//$'\r'/}"
    text="${text//$'\t'/\\t}"
    printf '"%s"' "$(printf '%s' "$text" | tr -d '\000-\010\013\014\016-\037')"
}

# record NAME STATUS SECONDS RESULT_JSON MESSAGE
record() {
    records+=("{\"step\": $(json_string "$1"), \"status\": \"$2\", \"seconds\": $3, \"result\": $4, \"message\": $(json_string "$5")}")
    case "$2" in
        ok) printf '[ok]      %-34s %4d s\n' "$1" "$3" ;;
        skipped) printf '[skipped] %-34s %s\n' "$1" "$5" ;;
        *)
            failures=$((failures + 1))
            printf '[%s] %-34s %4d s: %s\n' "$2" "$1" "$3" "$5"
            ;;
    esac
}

# step NAME LIMIT OUTPUT_KIND COMMAND...: runs COMMAND for at most LIMIT seconds (less when the
# budget runs out). OUTPUT_KIND json keeps the command's standard output as JSON in the record;
# text keeps it as a string.
step() {
    local name="$1" limit="$2" kind="$3"
    shift 3
    local remaining=$((budget - (SECONDS - started)))
    if ((remaining < 10)); then
        record "$name" skipped 0 null "the check's budget of $budget s is spent"
        return
    fi
    ((limit > remaining)) && limit=$remaining
    local log="$scratch/steps/$name"
    local step_started=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$log.out" 2>"$log.err"
    local code=$? seconds=$((SECONDS - step_started))
    local result=null
    if [[ -s "$log.out" ]]; then
        if [[ "$kind" == json && "$(head -c1 "$log.out")" =~ [\{\[] ]]; then
            result="$(cat "$log.out")"
        else
            result="$(json_string "$(cat "$log.out")")"
        fi
    fi
    local message
    message="$(grep -v '^\s*$' "$log.err" | tail -n 3)"
    case $code in
        0) record "$name" ok "$seconds" "$result" "" ;;
        124 | 137) record "$name" timeout "$seconds" "$result" "stopped after $limit s. $message" ;;
        *) record "$name" failed "$seconds" "$result" "exit code $code. $message" ;;
    esac
}

skip() {
    record "$1" skipped 0 null "$2"
}

cache="--set=data.cache_dir=$scratch/token-cache"
bench_train() {
    local backend="$1" config="$2" dtype="$3"
    step "train-$(basename "$config" .toml)-$backend-$dtype" 60 json \
        "$distillery" bench train "configs/$config" --json --warmup 2 --steps 5 "$cache" \
        --set "run.backend=\"$backend\"" --set "run.dtype=\"$dtype\""
}

# The same shapes in PyTorch: the quickstart teacher (shakespeare-teacher preset, tied
# embeddings, batch 16 x 128) and configs/bench-100m.toml (batch 8 x 256).
pytorch_train() {
    local shape="$1" dtype="$2"
    local arguments=(--device cuda --dtype "$dtype" --warmup 2 --steps 5)
    case "$shape" in
        quickstart-teacher)
            arguments+=(--hidden-size 256 --intermediate-size 704 --layers 4 --heads 4
                --batch-size 16 --seq-len 128 --tie-word-embeddings) ;;
        bench-100m)
            arguments+=(--hidden-size 768 --intermediate-size 2048 --layers 14 --heads 12
                --batch-size 8 --seq-len 256) ;;
    esac
    step "pytorch-$shape-cuda-$dtype" 60 json python3 "$bundle/scripts/pytorch_train_bench.py" "${arguments[@]}"
}

echo "gpu-check: $(uname -srm), bundle $bundle, budget $budget s$($cpu_only && echo ', cpu only')"
if ! $cpu_only && command -v nvidia-smi >/dev/null; then
    step nvidia-smi 20 text nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
        --format=csv,noheader
else
    skip nvidia-smi "$($cpu_only && echo 'cpu only' || echo 'nvidia-smi is not installed')"
fi
step devices 30 json "$distillery" devices --json

if $cpu_only; then
    step check-wgpu 120 json "$distillery" bench backend configs/tiny-test.toml --json "$cache" \
        --set 'run.backend="wgpu"'
    bench_train cpu quickstart-teacher.toml f32
else
    for backend in cuda wgpu; do
        step "check-$backend" 60 json "$distillery" bench backend configs/tiny-test.toml --json \
            "$cache" --set "run.backend=\"$backend\""
    done
    skip check-tch-cuda "LibTorch CUDA (2+ GB) does not fit the bundle; scripts/check-tch.sh builds it"
    torch_sees_gpu=false
    if command -v python3 >/dev/null &&
        python3 -c 'import sys, torch, transformers; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        torch_sees_gpu=true
    fi
    for shape in quickstart-teacher bench-100m; do
        for dtype in f32 bf16; do
            bench_train cuda "$shape.toml" "$dtype"
            if $torch_sees_gpu; then
                pytorch_train "$shape" "$dtype"
            else
                skip "pytorch-$shape-cuda-$dtype" "python3 with torch, transformers and a CUDA device not found"
            fi
        done
    done
fi

smollm2="${SMOLLM2:-$(compgen -G "$bundle/models/SmolLM2-135M-Instruct*.gguf" | head -n 1)}"
generate_backend=cuda
$cpu_only && generate_backend=cpu
if [[ -n "$smollm2" && -f "$smollm2" ]]; then
    # The float model: the GGUF's blocks dequantized into a checkpoint, on the cpu.
    smollm2_settings=("$cache" --set "model.from=\"$smollm2\"")
    step import-smollm2 60 text "$distillery" import configs/smollm2.toml --gguf "$smollm2" \
        --out "$scratch/smollm2-f32" "${smollm2_settings[@]}"
    step "generate-smollm2-$generate_backend" 90 json "$distillery" bench generate \
        configs/smollm2.toml --checkpoint "$scratch/smollm2-f32" --json --runs 2 \
        --new-tokens 64 "${smollm2_settings[@]}" --set "run.backend=\"$generate_backend\""
else
    skip "generate-smollm2-$generate_backend" "no SmolLM2 GGUF (set SMOLLM2=path or put it in $bundle/models/)"
fi

{
    printf '{\n  "bundle": %s,\n  "host": %s,\n  "cpu_only": %s,\n  "seconds": %d,\n  "failures": %d,\n  "steps": [\n' \
        "$(json_string "$(cat "$bundle/VERSION" 2>/dev/null)")" "$(json_string "$(uname -srm)")" \
        "$cpu_only" "$((SECONDS - started))" "$failures"
    for index in "${!records[@]}"; do
        ((index)) && printf ',\n'
        printf '    %s' "${records[$index]}"
    done
    printf '\n  ]\n}\n'
} >"$out.partial" && mv "$out.partial" "$out"
echo "gpu-check: $failures failed step(s) in $((SECONDS - started)) s; figures in $out"
((failures == 0))
