"""kill -9 at any moment: nothing that looks complete is incomplete, and resume=auto ends bit for bit
where a run that was never interrupted ends.

One run folder is killed three times, each kill followed by a rerun that resumes from what the
previous one left (so resuming after a resume is covered too):

1. between steps, after step 3 (checkpoint 2 complete, 3 not due): the slow-step hook aims it;
2. while checkpoint 4 is half-written (its files are there, its manifest is not);
3. while the finished model is being published (files uploaded, manifest not yet written);

then an in-process rerun finishes the job and its weights are compared with an uninterrupted run,
tensor by tensor with torch.equal. A frozen head keeps no checkpoints (it trains for seconds on
cached features), so there is nothing of it to resume; fine-tuning's checkpoints and resume are
tested in tests/test_head.py. Predict, killed between two chunks, leaves no output file (its
chunks go to a temporary name), and a rerun writes it whole.
"""

from __future__ import annotations

import json
import os
import random
import shutil
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
from medclf.runtime import STEP_SLEEP_ENV
from medclf.storage import PAUSE_AFTER_ENV
from tests.helpers import REPO, kill_when_seen, make_classifier, make_mlm_run, make_small_run, tree

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
    return kill_when_seen(command, env, pattern)


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


RANDOM_ARGS = [*ARGS[:-2], "max_steps=24", "checkpoint_every=1", "keep_last=2"]
KILLS = 8


def start_mlm(out: Path, model: Path, env: dict, log=subprocess.PIPE) -> subprocess.Popen:
    command = [sys.executable, "-m", "medclf", "mlm", f"out={out}", f"model={model}", *RANDOM_ARGS]
    return subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def timed_whole_run(out: Path, model: Path, env: dict) -> tuple[float, float]:
    """Run to the end; (seconds until step 1 was logged, seconds per step after it)."""
    started, first = time.monotonic(), None
    process = start_mlm(out, model, env)
    for line in process.stdout:
        if first is None and "step 1/24" in line:
            first = time.monotonic() - started
    assert process.wait(timeout=300) == 0 and first is not None
    return first, (time.monotonic() - started - first) / 23


def test_killed_at_seeded_random_moments_the_run_ends_bit_identical(tiny_bert, mtsamples, tmp_path):
    """SIGKILL at KILLS moments drawn by a seeded RNG, each followed by a run with resume=auto.

    Each moment is drawn between the process's start and the end of its third step, as timed on an
    uninterrupted run: a moment within start-up is taken from the process's start; a later one from
    the moment this process logs its data ("train: ..."), since start-up times vary on a busy
    machine. Start-up, resume, steps and checkpoint saves are all hit, and every kill lands in a
    process that is still running, so KILLS fit in one 24-step run."""
    env = {STEP_SLEEP_ENV: "0.1"}
    whole, killed = (make_mlm_run(tmp_path / name, mtsamples, train_rows=3) for name in ("whole", "killed"))
    start_up, per_step = timed_whole_run(whole, tiny_bert, env)
    rng, kills, done = random.Random(12), 0, killed / "mlm/model" / manifest.MANIFEST
    for kill in range(KILLS):
        log = tmp_path / f"run-{kill}.log"
        with log.open("w") as sink:  # a file, not a pipe: an unread pipe would stall the run
            process, started = start_mlm(killed, tiny_bert, env, sink), time.monotonic()
            moment = rng.uniform(0.0, start_up + 3 * per_step)
            if moment > start_up:  # into training: counted from this process's own start of it
                while "INFO medclf.mlm: train: " not in log.read_text() and process.poll() is None:
                    time.sleep(0.02)
                started, moment = time.monotonic(), moment - start_up
            time.sleep(max(0.0, started + moment - time.monotonic()))
            process.kill()
            process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]  # still running when killed
        kills += 1
        complete_checkpoints(killed)  # whatever was left verifies, and `latest` names a complete one
        assert not done.exists()
    final = start_mlm(killed, tiny_bert, env)
    output = final.communicate(timeout=300)[0]
    assert final.returncode == 0, output[-3000:]  # the last resume=auto finishes it
    a, b = ((run / "mlm/model/model.safetensors").read_bytes() for run in (whole, killed))
    assert a == b, f"weights differ after {kills} kills"
    history = [json.loads((run / "mlm/metrics.json").read_text())["history"] for run in (whole, killed)]
    assert history[0] == history[1] and len(history[0]) == 24


def killed_after_writing(args: list[str], written: str) -> None:
    """`medclf ARGS` in its own process, SIGKILLed just after it wrote a file whose URL contains `written`."""
    kill_when_seen([sys.executable, "-m", "medclf", *args], {PAUSE_AFTER_ENV: written}, "pausing after writing")


def test_prepare_killed_between_its_files_reruns_with_overwrite_to_the_same_files(mtsamples, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cli.main(["prepare", f"out={whole}", f"input={mtsamples}"])
    killed_after_writing(["prepare", f"out={killed}", f"input={mtsamples}"], "prepare/train.csv")
    assert (killed / "prepare/train.csv").exists() and not (killed / "prepare/stats.json").exists()
    cli.main(["prepare", f"out={killed}", f"input={mtsamples}", "overwrite=true"])  # what a user re-runs
    assert tree(killed / "prepare") == tree(whole / "prepare")


def test_head_killed_while_caching_features_reruns_to_the_same_outputs(prepared, tiny_bert, tmp_path):
    run = make_small_run(tmp_path / "run", prepared)
    args = ["head", f"out={run}", f"mlm.model={tiny_bert}", "head.max_length=64", "head.epochs=2"]
    cli.main(args)
    outputs = {folder: tree(run / folder) for folder in ("features", "head-pretrained")}
    features = {p.name: load_file(str(p))["features"] for p in (run / "features").iterdir()}
    assert {"metrics.json", "report.md", "confusion.png", "manifest.json"} <= outputs["head-pretrained"].keys()
    for folder in outputs:  # the same run folder again: the outputs name its paths
        shutil.rmtree(run / folder)
    killed_after_writing(args, "/features/")  # the first split's features cached, the second not
    assert len(list((run / "features").glob("*.safetensors"))) == 1 and not (run / "head-pretrained").exists()
    cli.main(args)  # the same command again: it reads the cached split
    assert tree(run / "head-pretrained") == outputs["head-pretrained"]
    # safetensors writes its metadata in no fixed order: the feature files' tensors are compared
    again = {p.name: load_file(str(p))["features"] for p in (run / "features").iterdir()}
    assert again.keys() == features.keys() and all(torch.equal(again[k], features[k]) for k in features)


def test_compare_killed_between_its_files_reruns_with_overwrite_to_the_same_outputs(prepared, tiny_bert, tmp_path):
    run = make_small_run(tmp_path / "run", prepared)
    other = shutil.copytree(tiny_bert, tmp_path / "other-bert")
    args = ["compare", f"out={run}", f"mlm.model={tiny_bert}", "head.max_length=64", "head.epochs=2"]
    args += [f"compare.encoders=[pretrained, {other}]", "compare.seeds=2", "compare.bootstrap=200"]
    cli.main(args)
    outputs = {name: (run / name).read_bytes() for name in ("comparison.json", "comparison.md")}
    for name in [*outputs, "comparison.job.json"]:  # the same run folder again: the outputs name its paths
        (run / name).unlink()
    killed_after_writing(args, "comparison.json")  # the json written, the md (the job's last file) not
    assert (run / "comparison.json").exists() and not (run / "comparison.md").exists()
    with pytest.raises(SystemExit):  # an output without the job's record: refused, naming overwrite=true
        cli.main(args)
    cli.main([*args, "overwrite=true"])  # what the refusal tells a user to re-run
    assert {name: (run / name).read_bytes() for name in outputs} == outputs
