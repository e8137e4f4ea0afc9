"""Compares two teacher caches written by `distillery teacher-cache` (the layout documented in
crates/distillery-distill/src/teacher_cache.rs): whether their headers' schedules, token ids and
logits are equal, and how far apart each row's rest (the log-sum-exp of the tokens outside the
top k) is. Exits non-zero when ids or logits differ or a rest differs by more than --tolerance.

    python3 scripts/compare_teacher_caches.py A.topk B.topk
"""

import argparse
import json
import struct
import sys

import numpy as np

SCHEDULE = ["seed", "validation_fraction", "seq_len", "batch_size", "micro_batches", "top_k",
            "temperature", "vocab_size", "id_bytes"]


def read_cache(path):
    data = open(path, "rb").read()
    if data[:8] != b"DSTLTOPK":
        sys.exit(f"{path}: not a distillery teacher cache")
    header_len = struct.unpack("<Q", data[8:16])[0]
    header = json.loads(data[16:16 + header_len])
    k, id_bytes = header["top_k"], header["id_bytes"]
    row_bytes = k * (id_bytes + 4) + 4
    body = np.frombuffer(data[16 + header_len:], dtype=np.uint8)
    rows = body.reshape(-1, row_bytes)
    ids = rows[:, :k * id_bytes].copy().view("<u4" if id_bytes == 4 else "<u2")
    logits = rows[:, k * id_bytes:k * id_bytes + 4 * k].copy().view("<f4")
    rest = rows[:, -4:].copy().view("<f4")[:, 0]
    return header, ids, logits, rest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    first, second = read_cache(args.first), read_cache(args.second)
    differing = [key for key in SCHEDULE if first[0][key] != second[0][key]]
    if differing:
        sys.exit(f"the caches were made for different runs: {', '.join(differing)}")
    same_ids = bool((first[1] == second[1]).all())
    same_logits = bool((first[2] == second[2]).all())
    rest_gap = float(np.abs(first[3] - second[3]).max())
    print(f"{len(first[3])} rows; ids equal: {same_ids}; logits equal: {same_logits}; "
          f"largest difference of a rest: {rest_gap:.3g}")
    if not (same_ids and same_logits and rest_gap <= args.tolerance):
        sys.exit(1)


if __name__ == "__main__":
    main()
