"""Integrity: every checkpoint and saved model lists each file's size and SHA-256 in a manifest.

A truncated file, a flipped byte or a deleted manifest is refused by name: in a checkpoint,
resume=auto says so and falls back to the previous complete one (and still ends with the weights
of an undamaged run); in the adapted model or a classifier, the job that loads it stops with one
line naming the file and exit status 2, writing nothing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medclf import config, mlm
from medclf.errors import EXIT_BAD_INPUT
from tests.helpers import make_classifier, make_small_run, run_cli, tree

pytestmark = pytest.mark.slow

ARGS = [
    "max_length=32",
    "batch_size=4",
    "micro_batch_size=2",
    "log_every=1",
    "lr=1e-3",
    "eval_blocks=4",
    "keep_last=10",
    "max_steps=4",
    "checkpoint_every=2",
]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-50])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


def case_ids(cases: list) -> list[str]:
    return [f"{damage.__name__} {name}" for damage, name, _ in cases]


# (how, which file of the folder, what the message must say)
CHECKPOINT_DAMAGE = [
    (truncate, "model.safetensors", r"model\.safetensors: \d+ bytes, manifest says"),
    (flip_a_byte, "optimizer.safetensors", r"optimizer\.safetensors: SHA-256 differs"),
    (flip_a_byte, "rng-rank00000.safetensors", r"rng-rank00000\.safetensors: SHA-256 differs"),
    (delete, "manifest.json", r"incomplete checkpoint \(no manifest\.json\)"),
]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, prepared, tiny_bert) -> Path:
    """A small run with a finished mlm job: checkpoints at steps 2 and 4, and the adapted model."""
    run = make_small_run(tmp_path_factory.mktemp("integrity") / "run", prepared, train_notes=6, validation_notes=4)
    mlm.run(config.load("mlm", None, [f"out={run}", f"model={tiny_bert}", *ARGS]))
    return run


@pytest.mark.parametrize("damage, name, expected", CHECKPOINT_DAMAGE, ids=case_ids(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_passed_over_and_resume_falls_back(
    damage, name, expected, whole, tiny_bert, tmp_path, caplog
):
    # What a run interrupted after its step-4 checkpoint leaves behind, with that checkpoint damaged.
    run = tmp_path / "run"
    shutil.copytree(whole / "prepare", run / "prepare")
    shutil.copytree(whole / "mlm" / "checkpoints", run / "mlm" / "checkpoints")
    damage(run / "mlm/checkpoints/step-0000004" / name)
    caplog.set_level(logging.INFO)
    mlm.run(config.load("mlm", None, [f"out={run}", f"model={tiny_bert}", *ARGS]))

    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 1 and "step-0000004" in skipped[0], caplog.text
    assert re.search(expected, skipped[0]), skipped[0]
    assert "step-0000002 at step 2" in caplog.text  # resumed from the previous complete checkpoint
    a, b = (load_file(str(r / "mlm/model/model.safetensors")) for r in (whole, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SAVED_MODEL_DAMAGE = [
    (truncate, "model.safetensors", r"mlm/model/model\.safetensors: \d+ bytes, manifest says"),
    (flip_a_byte, "model.safetensors", r"mlm/model/model\.safetensors: SHA-256 differs"),
    (flip_a_byte, "tokenizer.json", r"mlm/model/tokenizer\.json: SHA-256 differs"),
    (delete, "manifest.json", r"mlm/model has no model yet"),
]


@pytest.mark.parametrize("damage, name, expected", SAVED_MODEL_DAMAGE, ids=case_ids(SAVED_MODEL_DAMAGE))
def test_a_damaged_adapted_model_is_refused_by_name(damage, name, expected, whole, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(whole / "prepare", run / "prepare")
    shutil.copytree(whole / "mlm" / "model", run / "mlm" / "model")
    damage(run / "mlm" / "model" / name)
    before = tree(run)
    code, line = run_cli(["head", f"out={run}", "head.encoder=adapted", "head.max_length=32", "head.epochs=1"], capsys)
    assert code == EXIT_BAD_INPUT
    assert re.search(expected, line), line
    assert tree(run) == before


CLASSIFIER_DAMAGE = [
    (truncate, "head.safetensors", r"classifier/head\.safetensors: \d+ bytes, manifest says"),
    (flip_a_byte, "head.safetensors", r"classifier/head\.safetensors: SHA-256 differs"),
    (flip_a_byte, "classifier.json", r"classifier/classifier\.json: SHA-256 differs"),
    (delete, "manifest.json", r"classifier: incomplete classifier \(no manifest\.json\)"),
]


@pytest.mark.parametrize("damage, name, expected", CLASSIFIER_DAMAGE, ids=case_ids(CLASSIFIER_DAMAGE))
def test_a_damaged_classifier_is_refused_by_name(damage, name, expected, whole, tiny_bert, tmp_path, capsys):
    run = tmp_path / "run"
    classes = json.loads((whole / "prepare" / "labels.json").read_text())["classes"]
    make_classifier(run / "classifier", tiny_bert, classes)
    shutil.copy(whole / "prepare" / "validation.csv", run / "notes.csv")
    damage(run / "classifier" / name)
    before = tree(run)
    code, line = run_cli(
        ["predict", f"model={run}/classifier", f"input={run}/notes.csv", f"output={run}/predictions.csv"], capsys
    )
    assert code == EXIT_BAD_INPUT
    assert re.search(expected, line), line
    assert tree(run) == before
