"""kill -9 at any moment: nothing that looks complete is incomplete, and resume=auto ends bit for bit
where a run that was never interrupted ends.

One run folder is killed three times, each kill followed by a rerun that resumes from what the
previous one left (so resuming after a resume is covered too):

1. between steps, after step 3 (checkpoint 2 complete, 3 not due): the slow-step hook aims it;
2. while checkpoint 4 is half-written (its files are there, its manifest is not);
3. while the finished model is being published (files uploaded, manifest not yet written);

then an in-process rerun finishes the job and its weights are compared with an uninterrupted run,
tensor by tensor with torch.equal. The head job keeps no checkpoints (a frozen head trains for
seconds on cached features), so there is nothing of it to resume. Predict, killed between two
chunks, leaves no output file (its chunks go to a temporary name), and a rerun writes it whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from medclf import checkpoint, cli, config, manifest, mlm
from medclf.manifest import PAUSE_ENV
from medclf.mlm import STEP_SLEEP_ENV
from tests.helpers import REPO, make_classifier, make_mlm_run

pytestmark = pytest.mark.slow

ARGS = [
    "max_length=32",
    "batch_size=4",
    "micro_batch_size=2",
    "log_every=1",
    "lr=1e-3",
    "eval_blocks=4",
    "keep_last=10",
    "max_steps=8",
    "checkpoint_every=2",
]


def spec(out: Path, model: Path):
    return config.load("mlm", None, [f"out={out}", f"model={model}", *ARGS])


def run_until_killed(out: Path, model: Path, pattern: str, env: dict) -> str:
    """Start `medclf mlm` as its own process, SIGKILL it as soon as `pattern` shows in its output."""
    command = [sys.executable, "-m", "medclf", "mlm", f"out={out}", f"model={model}", *ARGS]
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, deadline = "", time.time() + 180
    try:
        while pattern not in seen and time.time() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            seen += line
    finally:
        process.kill()  # SIGKILL: no handler runs, no file is closed
        seen += process.communicate(timeout=60)[0]
    assert pattern in seen, f"never saw {pattern!r}:\n{seen[-3000:]}"
    assert process.returncode == -signal.SIGKILL, seen[-3000:]
    return seen


def complete_checkpoints(out: Path) -> list[int]:
    """Steps whose checkpoint looks complete (has a manifest), each verified file by file."""
    root = str(out / "mlm" / "checkpoints")
    complete = []
    for step in checkpoint.list_steps(root):
        url = checkpoint.step_url(root, step)
        if os.path.exists(os.path.join(url, manifest.MANIFEST)):
            manifest.verify(url)  # raises, naming the file, if anything listed is short or altered
            complete.append(step)
    latest = out / "mlm" / "checkpoints" / checkpoint.LATEST
    if latest.exists():  # the pointer is written after the manifest: it never names a partial save
        assert int(latest.read_text().strip().split("-")[1]) in complete
    model = out / "mlm" / "model"
    if (model / manifest.MANIFEST).exists():
        manifest.verify(str(model), "model")
    return complete


def test_killed_anywhere_the_resumed_run_ends_with_the_uninterrupted_weights(tiny_bert, mtsamples, tmp_path):
    whole, killed = (
        make_mlm_run(tmp_path / "whole", mtsamples, train_rows=3),
        make_mlm_run(tmp_path / "killed", mtsamples, train_rows=3),
    )
    mlm.run(spec(whole, tiny_bert))
    partial_model = killed / "mlm" / "model"

    # 1. between steps: step 3 done, checkpoint 2 complete
    run_until_killed(killed, tiny_bert, "step 3/8", {STEP_SLEEP_ENV: "0.5"})
    assert complete_checkpoints(killed) == [2]
    assert not partial_model.exists()

    # 2. mid-checkpoint: every file of step 4 written, its manifest not
    seen = run_until_killed(killed, tiny_bert, "pausing before the manifest of", {PAUSE_ENV: "120"})
    assert "resumed from" in seen and "step-0000002 at step 2" in seen
    assert (killed / "mlm/checkpoints/step-0000004/model.safetensors").exists()
    assert complete_checkpoints(killed) == [2]

    # 3. mid-publish of the finished model: its files there, its manifest not
    target = f"pausing before the manifest of {killed}/mlm/model"
    seen = run_until_killed(killed, tiny_bert, target, {PAUSE_ENV: "0.3"})
    assert "step-0000002 at step 2" in seen  # the half-written step 4 was passed over
    assert (partial_model / "model.safetensors").exists() and not (partial_model / "manifest.json").exists()
    assert complete_checkpoints(killed) == [2, 4, 6, 8]

    # the last rerun only finishes: nothing is trained twice, and the result is the uninterrupted one
    mlm.run(spec(killed, tiny_bert))
    assert complete_checkpoints(killed) == [2, 4, 6, 8]
    a = load_file(str(whole / "mlm/model/model.safetensors"))
    b = load_file(str(partial_model / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after kill -9 and resume: {different[:5]}"
    history = [json.loads((run / "mlm/metrics.json").read_text())["history"] for run in (whole, killed)]
    assert history[0] == history[1] and len(history[0]) == 8


def test_predict_killed_mid_file_leaves_no_output_and_a_rerun_writes_it_whole(tiny_bert, mtsamples, tmp_path):
    notes = pd.read_csv(mtsamples, dtype=str, keep_default_na=False).iloc[:500]
    notes = notes[notes["transcription"].str.strip() != ""][["sample_name", "transcription"]]
    notes.to_csv(tmp_path / "notes.csv", index=False)
    model = make_classifier(tmp_path / "classifier", tiny_bert, ["a", "b", "c"])
    output = tmp_path / "out" / "predictions.csv"
    args = [f"model={model}", f"input={tmp_path / 'notes.csv'}", f"output={output}", "chunk_rows=100"]
    command = [sys.executable, "-m", "medclf", "predict", *args]
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    while "100 rows classified" not in seen:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen += line
    process.kill()
    seen += process.communicate(timeout=60)[0]
    assert "100 rows classified" in seen and f"wrote {output}" not in seen, seen[-2000:]
    assert not output.exists()  # the chunks written so far sit under a temporary name only

    cli.main(["predict", *args])  # a leftover temporary is no "existing output"
    written = pd.read_csv(output)
    assert written["row"].tolist() == list(range(len(notes)))
