"""The dev-fold experiment behind mlm.attention_dropout's default, at tiny sizes: every job runs, the table adds up."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pandas as pd

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_attention_dropout_experiment_runs_both_values_and_pairs_them(tiny_bert, tmp_path):
    tiny = ["mlm.max_length=64", "head.max_length=64", "head.epochs=2", "mlm.loader_workers=0"]
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "attention_dropout.py"), "--model", str(tiny_bert)]
        + ["--out", str(tmp_path / "run"), "--seeds", "42", "43", "--max-steps", "2", "--eval-blocks", "4"]
        + ["--windows", "1", "--output", str(tmp_path / "figures.json"), "--set", *tiny],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures["runs"]) == {"0.1", "0.0"} and all(set(r) == {"42", "43"} for r in figures["runs"].values())
    for run in (r for value in figures["runs"].values() for r in value.values()):
        assert math.isfinite(run["dev_mlm_loss"]) and 0 <= run["dev_f1_weighted"] <= 1
    paired = figures["summary"]["dev_mlm_loss"]["0.0 - 0.1"]
    low, high = paired["ci95"]
    assert len(paired["per_seed"]) == 2 and low <= paired["mean"] <= high
    # the fold is the head's own: fit and dev hold no note in common
    fit, dev = (tmp_path / "run" / name for name in ("fit.csv", "dev.csv"))
    assert not set(pd.read_csv(fit)["transcription"]) & set(pd.read_csv(dev)["transcription"])
    # each adaptation kept the value asked for in its record, and published the model's own setting
    for value in ("0.1", "0.0"):
        record = json.loads((tmp_path / "run" / f"mlm-p{value}-s42" / "mlm" / "job.json").read_text())
        assert record["keys"]["mlm.attention_dropout"] == float(value)
