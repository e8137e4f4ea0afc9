"""The table of experiments/shakespeare-distill/RESULTS.md, from the runs' checkpoints and logs.

    cargo build --release
    target/release/distillery train configs/shakespeare-teacher.toml
    target/release/distillery train configs/shakespeare-student-baseline.toml
    target/release/distillery distill configs/shakespeare-student-distill.toml
    python3 scripts/distill_results.py [--run NAME=RUN_DIR_NAME ...]

Every model is evaluated by `distillery eval` on the same validation split, against the teacher of
configs/shakespeare-student-distill.toml (top-1 agreement). Wall time is the span of each run's
metrics.jsonl timestamps (first logged step to last), so it leaves out process start-up.
"""

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/shakespeare-student-distill.toml"


def evaluate(run):
    output = subprocess.run(
        [str(ROOT / "target/release/distillery"), "eval", CONFIG,
         "--checkpoint", f"checkpoints/{run}", "--json"],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    return json.loads(output)


def wall_seconds(run):
    lines = (ROOT / "experiments" / run / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(line)["wall_time"] for line in lines if line.strip()]
    return max(times) - min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="shakespeare-teacher")
    parser.add_argument("--baseline", default="shakespeare-student-baseline")
    parser.add_argument(
        "--student", action="append", default=None,
        help="LABEL=RUN for each distilled student (default: distilled=shakespeare-student-distill)",
    )
    args = parser.parse_args()
    students = args.student or ["distilled student=shakespeare-student-distill"]
    rows = [("teacher", args.teacher), ("baseline student (labels only)", args.baseline)]
    rows += [tuple(entry.split("=", 1)) for entry in students]

    results = {}
    print("| model | parameters | best step | val loss | val ppl | top-1 accuracy "
          "| agreement with teacher | wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, run in rows:
        result = evaluate(run)
        results[label] = result
        minutes, seconds = divmod(round(wall_seconds(run)), 60)
        print(f"| {label} (`{run}`) | {result['parameters']:,} | {result['step']} "
              f"| {result['loss']:.4f} | {result['perplexity']:.2f} | {result['accuracy']:.4f} "
              f"| {result['teacher_agreement']:.4f} | {minutes}:{seconds:02d} |")

    teacher = results["teacher"]
    baseline = results["baseline student (labels only)"]
    print()
    for label, _ in rows[2:]:
        student = results[label]
        gap = baseline["loss"] - teacher["loss"]
        closed = (baseline["loss"] - student["loss"]) / gap
        print(f"- {label}: validation loss {student['loss'] - baseline['loss']:+.4f} against the "
              f"baseline, closing {closed:.1%} of the baseline-to-teacher gap; perplexity "
              f"{baseline['perplexity']:.2f} -> {student['perplexity']:.2f}; top-1 accuracy "
              f"{student['accuracy'] / teacher['accuracy']:.1%} of the teacher's "
              f"(baseline {baseline['accuracy'] / teacher['accuracy']:.1%})")


if __name__ == "__main__":
    main()
