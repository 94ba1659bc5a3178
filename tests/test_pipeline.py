"""The whole tiny pipeline on real data, as CI runs it: jobs/tiny-cpu.yaml with MiniLM.

prepare (a few hundred notes) -> mlm (a few steps) -> head pretrained -> head adapted ->
compare -> evaluate -> predict, each job's own run(spec), all on the same output folder.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medclf import compare, config, evaluate, head, mlm, predict, prepare
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_tiny_pipeline_on_real_data(tmp_path, mtsamples, minilm):
    out = tmp_path / "run"
    text = (REPO / "jobs" / "tiny-cpu.yaml").read_text()

    def spec(job, *extra):
        base = [f"out={out}", f"prepare.input={mtsamples}", f"mlm.model={minilm}"]
        return config.load(job, text, base + list(extra), source="jobs/tiny-cpu.yaml")

    prepare.run(spec("prepare"))
    mlm.run(spec("mlm", "mlm.eval_blocks=16"))  # the pipeline, not perplexity, is under test here
    head.run(spec("head", "head.encoder=pretrained"))
    head.run(spec("head", "head.encoder=adapted"))
    compare.run(spec("compare"))
    evaluate.run(spec("evaluate", "evaluate.model=adapted"))
    predictions = tmp_path / "predictions.csv"
    predict.run(
        spec(
            "predict",
            f"predict.model={out}/head-adapted/model",
            f"predict.input={out}/prepare/validation.csv",
            f"predict.output={predictions}",
        )
    )

    # -- two encoders, two heads, the features of each encoded once (train and validation)
    assert len(list((out / "features").iterdir())) == 4
    validation = pd.read_csv(out / "prepare" / "validation.csv")
    for name in ("pretrained", "adapted"):
        metrics = json.loads((out / f"head-{name}" / "metrics.json").read_text())
        assert metrics["rows"] == len(validation)
        # a trained head beats always answering the commonest class
        assert metrics["accuracy"] > validation["medical_specialty"].value_counts(normalize=True).iloc[0] - 0.05
        assert metrics["any_label_accuracy"] >= metrics["accuracy"]
    info = json.loads((out / "head-adapted" / "model" / "classifier.json").read_text())
    assert info["encoder"] == str(out / "mlm" / "model") and info["max_length"] == 128

    # -- the comparison: a table for both encoders, the interval, McNemar and the verdict
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["metrics"]) == ["pretrained", "adapted", "baseline"] and len(summary["seeds"]) == 2
    low, high = summary["f1_weighted_difference"]["ci95"]
    assert low <= summary["f1_weighted_difference"]["observed"] <= high
    report = (out / "comparison.md").read_text()
    assert summary["verdict"] in report and "| f1_weighted |" in report and "McNemar" in report

    # -- evaluate agrees with the head's own report; predict keeps the validation order
    again = json.loads((out / "evaluate" / "adapted" / "metrics.json").read_text())
    assert again["accuracy"] == json.loads((out / "head-adapted" / "metrics.json").read_text())["accuracy"]
    rows = pd.read_csv(predictions)
    assert rows["text_id"].tolist() == validation["text_id"].tolist()
    hits = (rows["predicted_specialty"] == validation["medical_specialty"]).mean()
    assert abs(hits - again["accuracy"]) < 1e-9
