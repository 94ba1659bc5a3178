"""Batch prediction: columns, input order across chunks and length-sorted batches, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from medclf import classifier, config, features, head, predict
from medclf.errors import MedclfError
from tests.helpers import REPO, free_port, head_spec, make_small_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, prepared, tiny_bert):
    out = make_small_run(tmp_path_factory.mktemp("predict") / "run", prepared)
    head.run(head_spec(out, tiny_bert, "epochs=3", "lr=0.01", "windows=3", "window_pooling=max", "pooling=mean"))
    return out / "head-pretrained" / "model"


@pytest.fixture(scope="module")
def notes(prepared) -> pd.DataFrame:
    """Notes of very different lengths, shuffled, with a repeat: sorting and dedup must not show in the output."""
    df = pd.read_csv(prepared / "prepare" / "validation.csv", dtype=str, keep_default_na=False).iloc[:11]
    df = df[["text_id", "transcription"]].copy()
    df.loc[3, "transcription"] = "Brief note: knee pain."
    df.loc[8, "transcription"] = df.loc[1, "transcription"]
    df.insert(0, "note_id", [f"n{i}" for i in range(len(df))])
    return df


def test_predict_writes_columns_and_rows_in_input_order(model_dir, notes, tmp_path):
    source, target = tmp_path / "notes.csv", tmp_path / "out" / "pred.csv"
    notes.to_csv(source, index=False)
    predict.run(
        config.load(
            "predict",
            None,
            [f"model={model_dir}", f"input={source}", f"output={target}", "chunk_rows=4", "batch_size=3"],
        )
    )
    out = pd.read_csv(target, dtype={"note_id": str})
    classes = json.loads((model_dir / "classifier.json").read_text())["classes"]
    assert list(out.columns) == ["row", "note_id", "text_id"] + [f"prob_{c}" for c in classes] + ["predicted_specialty"]
    assert out["row"].tolist() == list(range(len(notes))) and out["note_id"].tolist() == notes["note_id"].tolist()
    probs = out[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (out["predicted_specialty"] == np.asarray(classes)[probs.argmax(1)]).all()

    # each row's probabilities are its own note's, classified alone
    model, tokenizer, info = classifier.load(str(model_dir))
    with torch.no_grad():
        for i, text in enumerate(notes["transcription"]):
            windows = features.tokenize_windows(tokenizer, [text], info.windowing)[0]  # the whole note
            ids, mask = features.pad(windows, tokenizer.pad_token_id)
            alone = torch.softmax(model(ids, mask, torch.tensor([len(windows)])), -1)[0].numpy()
            assert np.allclose(probs[i], alone, atol=1e-5), i
    # the rows really differ, so the per-row check above could tell a swapped row
    assert np.abs(probs - probs[3]).max() > 1e-4


def test_predict_bad_input(model_dir, notes, tmp_path):
    source, target = tmp_path / "notes.csv", tmp_path / "pred.csv"

    def run(*extra):
        predict.run(config.load("predict", None, [f"model={model_dir}", f"input={source}", f"output={target}", *extra]))

    notes.rename(columns={"transcription": "text"}).to_csv(source, index=False)
    missing = r"notes.csv: missing column\(s\) transcription \(dataset.text_column\)"
    missing += "; columns present: note_id, text_id, text$"
    with pytest.raises(MedclfError, match=missing):
        run()
    run("text_column=text")  # the column named in the spec is the one read
    before = target.stat().st_mtime_ns, target.read_bytes()
    run("text_column=text", "chunk_rows=3")  # up to date: chunk_rows changes speed only
    assert (target.stat().st_mtime_ns, target.read_bytes()) == before
    with pytest.raises(MedclfError, match=r"dataset.text_column: text there, transcription now; overwrite=true"):
        run()

    blank = notes.copy()
    blank.loc[6, "transcription"] = "  "
    blank.to_csv(source, index=False)
    with pytest.raises(MedclfError, match=r"notes.csv: row 7: empty transcription"):
        run("overwrite=true", "chunk_rows=4")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("transcription,id,id\na note,1,2\n", r"line 1: header names column 'id' twice"),
        ('id,transcription\n1,"a note\n2,another note\n', r"line 2: .*a quote that never closes"),
        ('id,transcription\n1,"a note" and more\n', r"line 2: broken quoting"),
        ("id,transcription\n1,a note\n2,another,note\n", r"line 3: 3 fields, the header has 2"),
        ("id,transcription\n1,a note\r2,another\n", r"line 2: ends with a bare carriage return"),
        ("id,transcription\n1,a \0note\n", r"line 2: NUL byte"),
    ],
)
def test_predict_refuses_what_pandas_would_silently_repair(text, expected, model_dir, tmp_path):
    source, target = tmp_path / "notes.csv", tmp_path / "pred.csv"
    source.write_text(text, encoding="utf-8")
    spec = config.load("predict", None, [f"model={model_dir}", f"input={source}", f"output={target}", "chunk_rows=1"])
    with pytest.raises(MedclfError, match=rf"notes\.csv: {expected}"):
        predict.run(spec)
    assert not target.exists() and list(tmp_path.iterdir()) == [source]


def test_two_ranks_write_the_same_rows_as_one_process(model_dir, notes, tmp_path):
    """A real 2-rank gloo run (PLATFORM.md: --multi_gpu plus ACCELERATE_USE_CPU=1): the shards gather back in order."""

    source = tmp_path / "notes.csv"
    notes.to_csv(source, index=False)
    args = [f"--model={model_dir}", f"--input={source}", "--chunk_rows=5", "--batch_size=2"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "medclf",
        "predict",
        *args,
        f"--output={tmp_path / 'two.csv'}",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerator: 2 process(es)" in result.stderr
    assert f"preflight: the folder of predict.output ({tmp_path}) is seen by all 2 processes" in result.stderr
    predict.run(config.load("predict", None, [a.lstrip("-") for a in args] + [f"output={tmp_path / 'one.csv'}"]))
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert one.columns.tolist() == two.columns.tolist() and one["row"].tolist() == two["row"].tolist()
    assert (one["predicted_specialty"] == two["predicted_specialty"]).all()
    probs = [c for c in one.columns if c.startswith("prob_")]
    assert np.allclose(one[probs].to_numpy(), two[probs].to_numpy(), atol=1e-5)
