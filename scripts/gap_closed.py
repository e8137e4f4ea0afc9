"""Each distilled student's share of the loss gap between its label-only twin and the teacher.

    python3 scripts/gap_closed.py --baseline smollm2-student-narrow-baseline \
        smollm2-student-narrow smollm2-student-narrow-cached

Reads the runs' `experiments/RUN/metrics.jsonl`: the teacher's validation loss and top-1
accuracy (logged at step 0 of a distillation run) and every run's validation records. At each
step where the twin and a student were both validated on the same windows:

    gap closed = (twin loss - student loss) / (twin loss - teacher loss)

and the student's top-1 accuracy as a share of the teacher's. Prints a Markdown table.

With `--models`, reads a pipeline's evaluation instead (the JSON its `eval` stage writes, every
model on the same windows) and names the models as the stage lists them:

    python3 scripts/gap_closed.py --models experiments/smollm2-distill/models.json \
        --teacher models/SmolLM2-135M-Instruct.Q4_1.gguf --baseline baseline live cached
"""

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def records(run):
    path = ROOT / "experiments" / run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics (has the run `{run}` been trained here?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validations(run):
    """step -> (loss, top-1) for every validation record; later records win (a resumed run)."""
    return {
        r["step"]: (r["val/loss"], r["val/accuracy"])
        for r in records(run)
        if "val/loss" in r
    }


def teacher(run):
    found = [r for r in records(run) if "teacher/val_loss" in r]
    if not found:
        raise SystemExit(f"run `{run}` logged no teacher validation")
    return found[-1]["teacher/val_loss"], found[-1]["teacher/val_accuracy"]


def evaluated(path):
    """name -> (loss, top-1) from an eval stage's JSON, whose `models` name its `validation`."""
    data = json.loads(Path(path).read_text())
    return {
        name: (result["loss"], result["accuracy"])
        for name, result in zip(data["models"], data["validation"])
    }


def share_row(name, twin_loss, loss, top1, teacher_loss, teacher_top1, step=None):
    closed = (twin_loss - loss) / (twin_loss - teacher_loss)
    step = "" if step is None else f" {step} |"
    return (
        f"| {name} |{step} {twin_loss:.4f} | {loss:.4f} | {closed:.1%} "
        f"| {top1:.4f} ({top1 / teacher_top1:.1%}) |"
    )


def from_models(args):
    results = evaluated(args.models)
    for name in [args.teacher, args.baseline] + args.students:
        if name not in results:
            raise SystemExit(f"{args.models}: no model named `{name}` (it has {list(results)})")
    teacher_loss, teacher_top1 = results[args.teacher]
    twin_loss = results[args.baseline][0]
    print(f"teacher: validation loss {teacher_loss:.4f}, top-1 {teacher_top1:.4f}\n")
    print("| model | twin's loss | student's loss | gap closed | top-1 (share of the teacher's) |")
    print("|---|---:|---:|---:|---|")
    for student in args.students:
        loss, top1 = results[student]
        print(share_row(student, twin_loss, loss, top1, teacher_loss, teacher_top1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the label-only twin's run name")
    parser.add_argument("--models", help="an eval stage's JSON to read instead of the runs' logs")
    parser.add_argument("--teacher", help="with --models: the teacher's name there")
    parser.add_argument("students", nargs="+", help="distilled runs of the same schedule")
    args = parser.parse_args()
    if args.models:
        if not args.teacher:
            raise SystemExit("--models needs --teacher")
        return from_models(args)

    teacher_loss, teacher_top1 = teacher(args.students[0])
    for student in args.students[1:] + [args.baseline]:
        other = teacher(student)[0]
        if abs(other - teacher_loss) > 1e-9:
            raise SystemExit(
                f"run `{student}` measured the teacher at {other}, not {teacher_loss}: "
                "different validation windows"
            )
    twin = validations(args.baseline)
    print(f"teacher: validation loss {teacher_loss:.4f}, top-1 {teacher_top1:.4f}\n")
    print("| run | step | twin's loss | student's loss | gap closed | top-1 (share of the teacher's) |")
    print("|---|---:|---:|---:|---:|---|")
    for student in args.students:
        for step, (loss, top1) in sorted(validations(student).items()):
            if step not in twin:
                continue
            print(share_row(student, twin[step][0], loss, top1, teacher_loss, teacher_top1, step))


if __name__ == "__main__":
    main()
