#!/usr/bin/env bash
# Whether two builds of distillery compute the same numbers: for a change meant to leave
# behaviour alone (a refactor), run the build before it and the build after it through short
# versions of every stage on this machine and compare what they wrote.
#
#   scripts/compare-builds.sh BEFORE_BINARY AFTER_BINARY
#
# Stages: training (tiny-test, 40 steps), its evaluation, int8 and GPTQ 4-bit (true-sequential
# and not); a quickstart teacher (10 steps), a student distilled from it, the teacher cache, the
# student's evaluation against the teacher and its GPTQ (act-order, embeddings and head).
# Compared: every logged loss, the evaluation JSON, the quantized safetensors byte for byte and
# the teacher cache's logits (its header names the teacher's file, whose hash differs between
# processes as burnpack's parameter ids do). Exits non-zero at the first difference.
set -euo pipefail
cd "$(dirname "$0")/.."

if (($# != 2)); then
    echo "usage: $0 BEFORE_BINARY AFTER_BINARY" >&2
    exit 2
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

run_stages() {
    local binary="$1" out="$2"
    mkdir -p "$out"
    local tiny=(--set "run.checkpoint_dir=\"$out\"")
    "$binary" train configs/tiny-test.toml "${tiny[@]}" >"$out/train.log" 2>&1
    "$binary" eval configs/tiny-test.toml "${tiny[@]}" --checkpoint "$out/tiny-test" --json \
        >"$out/eval.json" 2>/dev/null
    "$binary" quantize configs/tiny-test.toml "${tiny[@]}" --set 'quantize.method="int8"' \
        >/dev/null 2>&1
    for sequential in true false; do
        "$binary" quantize configs/tiny-test.toml "${tiny[@]}" --set 'quantize.method="gptq"' \
            --set quantize.group_size=32 --set quantize.nsamples=16 \
            --set "quantize.true_sequential=$sequential" \
            --set "quantize.name=\"gptq-sequential-$sequential\"" >/dev/null 2>&1
    done

    local short=(--set "run.checkpoint_dir=\"$out\"" --set train.steps=10 --set train.batch_size=4
        --set train.warmup_steps=2 --set eval.every=10 --set checkpoint.every=10
        --set eval.max_windows=8)
    local teacher=(--set "teacher.checkpoint=\"$out/quickstart-teacher\"")
    "$binary" train configs/quickstart-teacher.toml "${short[@]}" >"$out/teacher.log" 2>&1
    "$binary" distill configs/quickstart-student.toml "${short[@]}" "${teacher[@]}" \
        >"$out/student.log" 2>&1
    "$binary" teacher-cache configs/quickstart-student.toml "${short[@]}" "${teacher[@]}" \
        --set 'distill.teacher="cached"' >"$out/cache.log" 2>&1
    local cache
    cache="$(sed -n 's/^wrote \([^ ]*\.topk\) .*/\1/p' "$out/cache.log")"
    mv "$cache" "$out/teacher.topk"
    "$binary" eval configs/quickstart-student.toml "${short[@]}" "${teacher[@]}" \
        --checkpoint "$out/quickstart-student" --json >"$out/student-eval.json" 2>/dev/null
    "$binary" quantize configs/quickstart-student.toml "${short[@]}" "${teacher[@]}" \
        --set quantize.nsamples=16 >/dev/null 2>&1
}

# The logits after the header: magic (8 bytes), header length (u64, little-endian), header.
cache_payload() {
    python3 -c '
import sys
data = open(sys.argv[1], "rb").read()
sys.stdout.buffer.write(data[16 + int.from_bytes(data[8:16], "little"):])' "$1"
}

run_stages "$1" "$scratch/before"
run_stages "$2" "$scratch/after"

differs() {
    echo "DIFFERENT: $1" >&2
    exit 1
}
for log in train teacher student; do
    cmp -s <(grep -o 'loss [0-9.]*' "$scratch/before/$log.log") \
        <(grep -o 'loss [0-9.]*' "$scratch/after/$log.log") || differs "losses in $log.log"
    echo "same losses: $log ($(grep -c 'loss' "$scratch/after/$log.log") lines)"
done
for report in eval.json student-eval.json; do
    cmp -s <(sed "s#$scratch/before#RUN#g" "$scratch/before/$report") \
        <(sed "s#$scratch/after#RUN#g" "$scratch/after/$report") || differs "$report"
    echo "same evaluation: $report"
done
found=0
for weights in "$scratch"/before/*/model.safetensors; do
    relative="${weights#"$scratch"/before/}"
    cmp -s "$weights" "$scratch/after/$relative" || differs "$relative"
    echo "same bytes: $relative"
    found=$((found + 1))
done
((found == 4)) || differs "expected 4 quantized models, found $found"
cmp -s <(cache_payload "$scratch/before/teacher.topk") <(cache_payload "$scratch/after/teacher.topk") ||
    differs "teacher cache logits"
echo "same teacher cache logits"
echo "the two builds computed the same numbers"
