"""The dev-fold experiment behind `mlm.attention_dropout`'s default: adapt with and without attention
dropout, then compare the adapted encoders on a dev fold carved from the training notes.

    python experiments/attention_dropout.py           # the README's figures: 3 seeds × {0.1, 0}, ~45 min on 2 cores
    python experiments/attention_dropout.py --seeds 42 --max-steps 2 --windows 1   # a quick look

Validation is never read: the dev fold is the head's own (`head.dev_fraction=0.2`, seed 42: 20% of
the training notes, grouped), written once as fit.csv and dev.csv. For each value and seed, `medclf
mlm` adapts the model on fit.csv with the spec's mlm settings and reports masked-LM loss on dev.csv
(`--eval-blocks` fixed-mask blocks, the same masks for every run). Then `medclf head` trains the
spec's head on that encoder's frozen features with the same dev fold and keeps its best epoch's dev
weighted F1 and accuracy. Each figure is given per value (mean ± sd over seeds) and as the paired
difference between the values, with a t 95% interval over the seeds. The jobs are medclf's own, so
a second run finds them up to date and only prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

from scipy import stats

from medclf import config, data, head

REPO = pathlib.Path(__file__).resolve().parents[1]
DEV_FRACTION, DEV_SEED = 0.2, 42  # the fold README's other dev-fold choices were made on


def medclf(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medclf", *args], check=True, cwd=REPO)


def write_dev_fold(spec_path: str, out: pathlib.Path, overrides: list[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """fit.csv and dev.csv: the prepared train split less, and only, the head's dev fold."""
    spec = config.load("head", pathlib.Path(spec_path).read_text(), [f"out={out}", *overrides])
    classes, train, _ = data.read_splits(str(out), spec.dataset, None, None)
    fit, dev = head.carve_dev(train, DEV_FRACTION, DEV_SEED, classes)
    paths = out / "fit.csv", out / "dev.csv"
    for (_, frame, _), path in zip((fit, dev), paths, strict=True):
        frame.drop(columns=["text_id"], errors="ignore").to_csv(path, index=False)
    return paths


def summarise(values: list[str], seeds: list[int], figures: dict) -> dict:
    """Mean ± sd per value, and the paired difference (second value minus first) with a t 95% interval."""
    summary: dict = {}
    for metric in ("dev_mlm_loss", "dev_f1_weighted", "dev_accuracy", "mlm_tokens_per_s"):
        per_value = {v: [figures[v][s][metric] for s in seeds] for v in values}
        row = {
            v: {"mean": statistics.mean(x), "sd": statistics.stdev(x) if len(x) > 1 else 0.0}
            for v, x in per_value.items()
        }
        if len(values) == 2:
            diffs = [b - a for a, b in zip(per_value[values[0]], per_value[values[1]], strict=True)]
            mean = statistics.mean(diffs)
            half = (
                stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
                if len(diffs) > 1
                else float("nan")
            )
            row[f"{values[1]} - {values[0]}"] = {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": diffs}
        summary[metric] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO / "jobs" / "quickstart.yaml"))
    parser.add_argument("--out", default=str(REPO / "runs" / "attention-dropout"))
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--values", nargs="+", default=["0.1", "0.0"], help="mlm.attention_dropout values")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--eval-blocks", type=int, default=200, help="dev blocks scored by masked-LM loss")
    parser.add_argument("--max-steps", type=int, default=None, help="mlm.max_steps (default: the spec's)")
    parser.add_argument("--windows", type=int, default=None, help="head.windows (default: the spec's)")
    parser.add_argument("--set", nargs="*", default=[], help="more key=value overrides for both jobs")
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    out = pathlib.Path(args.out).resolve()
    common = [f"out={out}", *args.set]
    medclf("prepare", args.spec, *common)
    fit, dev = write_dev_fold(args.spec, out, args.set)

    figures: dict = {v: {} for v in args.values}
    for seed in args.seeds:
        for value in args.values:
            name = f"p{value}-s{seed}"
            adapted = out / f"mlm-{name}"
            mlm_args = [f"mlm.model={args.model}", f"mlm.attention_dropout={value}", f"mlm.train={fit}"]
            mlm_args += [f"mlm.validation={dev}", f"mlm.eval_blocks={args.eval_blocks}", f"seed={seed}"]
            mlm_args += [f"mlm.max_steps={args.max_steps}"] if args.max_steps else []
            medclf("mlm", args.spec, *common, f"out={adapted}", *mlm_args)
            # The same dev fold and head seed for every encoder: only the adaptation differs.
            head_args = [f"head.encoder={adapted / 'mlm' / 'model'}", f"head.name={name}"]
            head_args += [f"head.dev_fraction={DEV_FRACTION}", f"head.seed={DEV_SEED}"]
            head_args += [f"head.windows={args.windows}"] if args.windows else []
            medclf("head", args.spec, *common, *head_args)
            adapted_metrics = json.loads((adapted / "mlm" / "metrics.json").read_text())
            dev_scores = json.loads((out / f"head-{name}" / "metrics.json").read_text())["dev"]
            figures[value][seed] = {
                "dev_mlm_loss": adapted_metrics["val_after"]["loss"],
                "dev_mlm_perplexity": adapted_metrics["val_after"]["perplexity"],
                "mlm_tokens_per_s": adapted_metrics["tokens_per_s"],
                "dev_f1_weighted": dev_scores["f1_weighted"],
                "dev_accuracy": dev_scores["accuracy"],
                "best_epoch": dev_scores["best_epoch"],
            }
    result = {"spec": args.spec, "model": args.model, "seeds": args.seeds, "runs": figures}
    result["summary"] = summarise(args.values, args.seeds, figures)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
