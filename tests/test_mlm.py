"""The masked-LM job on a tiny BERT (and once on the real MiniLM): loss, masks, resume, signals, checks."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from medclf import checkpoint, cli, config, mlm, tokenstore
from medclf.errors import EXIT_DIVERGED, EXIT_PREEMPTED, MedclfError
from medclf.masking import IGNORE, Masker, epoch_order
from medclf.tokenstore import StreamBlocks
from tests.helpers import (
    REPO,
    TINY_MLM_ARGS,
    Ranks,
    assert_same_weights,
    make_mlm_run,
    make_tiny_distilbert,
    mlm_spec,
    run_cli,
    tree,
    weights,
)

# ---------------------------------------------------------------- the loss


def test_masked_only_loss_equals_stock_loss(tiny_bert):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (3, 40), generator=generator)
    chosen = torch.rand(3, 40, generator=generator) < 0.15
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    with torch.no_grad():
        stock = model(input_ids=input_ids, labels=labels).loss
        ours = mlm.MaskedLM(model)(input_ids, labels) / chosen.sum()
    assert chosen.sum() > 5
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- masks and blocks


def test_the_full_projection_loss_is_a_sum_and_zero_when_nothing_is_masked(tiny_bert, tmp_path):
    from transformers import AutoModelForMaskedLM

    folder = make_tiny_distilbert(tmp_path / "distil", tiny_bert)
    model = mlm.MaskedLM(AutoModelForMaskedLM.from_pretrained(folder)).eval()
    assert mlm.prediction_head(model.model) is None  # DistilBERT's vocab_projector: the fallback path
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 900, (2, 16), generator=generator)
    nothing = torch.full_like(input_ids, IGNORE)
    chosen = torch.rand(2, 16, generator=generator) < 0.3
    labels = torch.where(chosen, input_ids, nothing)
    with torch.no_grad():
        assert model(input_ids, nothing).item() == 0.0  # the stock mean over no token is NaN
        stock = model.model(input_ids=input_ids, labels=labels).loss
        assert torch.allclose(model(input_ids, labels) / chosen.sum(), stock, atol=1e-5)


@pytest.mark.slow
def test_distilbert_with_unmasked_micro_batches_trains_to_finite_weights(tiny_bert, mtsamples, tmp_path):
    # Blocks of 8 tokens at 5% masking: most single-block micro-batches have no masked token at all.
    model = make_tiny_distilbert(tmp_path / "distil", tiny_bert)
    out = make_mlm_run(tmp_path / "run", mtsamples, train_rows=2)
    args = ["max_length=8", "mlm_probability=0.05", "batch_size=4", "micro_batch_size=1", "max_steps=6"]
    mlm.run(mlm_spec(out, model, *args))
    history = json.loads((out / "mlm" / "metrics.json").read_text())["history"]
    assert len(history) == 6 and all(math.isfinite(loss) for _, loss, _ in history), history
    assert all(torch.isfinite(t).all() for t in weights(out).values())


@pytest.mark.slow
def test_a_non_finite_loss_stops_before_the_step_and_nothing_non_finite_is_saved(
    tiny_bert, mtsamples, tmp_path, capsys, monkeypatch
):
    calls = []
    forward = mlm.MaskedLM.forward

    def poisoned(self, input_ids, labels):  # the 3rd step's first micro-batch (2 per step) gives NaN
        loss = forward(self, input_ids, labels)
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(mlm.MaskedLM, "forward", poisoned)
    out = make_mlm_run(tmp_path / "run", mtsamples, train_rows=2)
    code, line = run_cli(
        [
            "mlm",
            f"out={out}",
            f"model={tiny_bert}",
            *TINY_MLM_ARGS,
            "max_length=32",
            "max_steps=5",
            "checkpoint_every=1",
        ],
        capsys,
    )
    assert code == EXIT_DIVERGED == 3
    assert "step 3: the loss or gradient is not finite" in line and "lower mlm.lr" in line, line
    root = out / "mlm" / "checkpoints"
    assert checkpoint.list_steps(str(root)) == [1, 2]
    assert (root / "latest").read_text().strip() == "step-0000002"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(root / "step-0000002" / "model.safetensors")).values())
    assert not (out / "mlm" / "model").exists() and not (out / "mlm" / "metrics.json").exists()


def test_masks_are_seeded_by_epoch_and_follow_80_10_10(tiny_bert):
    ids = torch.randint(10, 1000, (20000,))
    ids[::50] = 2  # a special token, never masked
    masker = Masker(mask_token_id=4, vocab_size=1000, special_ids=[2, 4], probability=0.15)
    starts = torch.ones_like(ids, dtype=torch.bool)
    inputs, labels = masker.block(ids, starts, seed=1, epoch=0, index=7)
    again = masker.block(ids, starts, seed=1, epoch=0, index=7)
    other_epoch = masker.block(ids, starts, seed=1, epoch=1, index=7)
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(labels, other_epoch[1])
    chosen = labels != IGNORE
    assert 0.14 < chosen.float().mean() < 0.16
    assert not chosen[::50].any()
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (inputs[chosen] == 4).float().mean()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean()
    assert 0.77 < as_mask < 0.83 and 0.08 < unchanged < 0.12
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_whole_word_masking_takes_every_piece_of_a_word():
    ids = torch.arange(10, 4010)
    starts = torch.zeros(4000, dtype=torch.bool)
    starts[::4] = True  # words of four pieces
    masker = Masker(mask_token_id=4, vocab_size=5000, special_ids=[], probability=0.15, whole_word=True)
    _, labels = masker.block(ids, starts, seed=3, epoch=0, index=0)
    by_word = (labels != IGNORE).view(-1, 4)
    assert by_word.any()
    assert torch.equal(by_word.all(dim=1), by_word.any(dim=1))


def test_tokens_are_stored_once_and_packed_without_padding(tiny_bert, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["the patient was seen today for knee pain", "no acute distress noted on exam"]
    csv = tmp_path / "notes.csv"
    pd.DataFrame({"transcription": texts}).to_csv(csv, index=False)
    built = tokenstore.build([str(csv)], "transcription", tokenizer, str(tmp_path / "cache"), 8, Ranks())
    assert len(list((tmp_path / "cache").iterdir())) == 1 and built.tokens_built > 0
    with caplog.at_level(logging.INFO, logger="medclf"):
        again = tokenstore.build([str(csv)], "transcription", tokenizer, str(tmp_path / "cache"), 8, Ranks())
    assert again.tokens_built == 0 and "tokenized" not in caplog.text
    ids, _ = again.stream.tokens(0, len(again.stream))
    assert torch.equal(torch.from_numpy(ids), torch.from_numpy(built.stream.tokens(0, len(built.stream))[0]))
    assert ids[0] == tokenizer.cls_token_id and (ids == tokenizer.sep_token_id).sum() == 2
    blocks = StreamBlocks(again.stream, 8)
    assert len(blocks) == len(ids) // 8 and np.array_equal(
        np.concatenate([blocks[i][0] for i in range(len(blocks))]), ids[: len(blocks) * 8]
    )
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))
    assert list(epoch_order(10, 0, 0)) != list(epoch_order(10, 0, 1))


# ---------------------------------------------------------------- the job


@pytest.mark.slow
def test_loss_goes_down(tiny_bert, mtsamples, tmp_path):
    out = make_mlm_run(tmp_path / "run", mtsamples, train_rows=3)
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=16", "lr=5e-3", "checkpoint_every=100"))
    metrics = json.loads((out / "mlm" / "metrics.json").read_text())
    losses = [h[1] for h in metrics["history"]]
    assert len(losses) == 16 and metrics["world_size"] == 1
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    assert metrics["val_after"]["loss"] < metrics["val_before"]["loss"]
    assert metrics["val_after"]["masked_tokens"] == metrics["val_before"]["masked_tokens"] > 0


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tiny_bert, mtsamples, tmp_path):
    # 4 notes: about 6 steps per epoch, so resuming from step 3 continues mid-epoch and crosses into epoch 2.
    whole, resumed = make_mlm_run(tmp_path / "whole", mtsamples), make_mlm_run(tmp_path / "resumed", mtsamples)
    mlm.run(mlm_spec(whole, tiny_bert, "epochs=2", "checkpoint_every=3"))
    metrics = json.loads((whole / "mlm" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] > 6
    # An interrupted run leaves exactly this behind: the step-3 checkpoint (and a later, unfinished save).
    shutil.copytree(whole / "mlm/checkpoints/step-0000003", resumed / "mlm/checkpoints/step-0000003")
    shutil.copytree(whole / "mlm/checkpoints/step-0000006", resumed / "mlm/checkpoints/step-0000006")
    (resumed / "mlm/checkpoints/step-0000006/manifest.json").unlink()
    mlm.run(mlm_spec(resumed, tiny_bert, "epochs=2", "checkpoint_every=3"))
    assert_same_weights(weights(whole), weights(resumed))
    assert json.loads((resumed / "mlm" / "metrics.json").read_text())["history"] == metrics["history"]


@pytest.mark.slow
def test_the_adapted_model_loads_and_the_output_is_not_replaced(tiny_bert, mtsamples, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = make_mlm_run(tmp_path / "run", mtsamples)
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=2", "checkpoint_every=1", "keep_last=1"))
    assert checkpoint.list_steps(str(out / "mlm" / "checkpoints")) == [2]
    assert (out / "mlm/checkpoints/latest").read_text().strip() == "step-0000002"
    folder = out / "mlm" / "model"
    assert json.loads((folder / "manifest.json").read_text())["files"]["model.safetensors"]["size"] > 0
    AutoModelForMaskedLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    before = tree(out)
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=2", "log_every=5", "resume=never"))  # up to date: nothing rewritten
    assert tree(out) == before and (out / "mlm" / "job.json").exists()
    with pytest.raises(MedclfError, match=r"mlm.max_steps: 2 there, 3 now; overwrite=true starts mlm over"):
        mlm.run(mlm_spec(out, tiny_bert, "max_steps=3"))
    (out / "mlm" / "job.json").unlink()  # a model from an older run, or one whose record was lost
    with pytest.raises(MedclfError, match=r"mlm/model: output exists without job.json"):
        mlm.run(mlm_spec(out, tiny_bert, "max_steps=2"))
    shutil.rmtree(folder)
    with pytest.raises(MedclfError, match="checkpoints exist"):
        mlm.run(mlm_spec(out, tiny_bert, "max_steps=2", "resume=never"))
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=1", "resume=never", "overwrite=true"))
    assert checkpoint.list_steps(str(out / "mlm" / "checkpoints")) == [1]
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=2", "overwrite=true"))  # differs: checkpoints discarded, not resumed
    assert checkpoint.list_steps(str(out / "mlm" / "checkpoints")) == [2]


def test_attention_dropout_is_set_while_adapting_and_the_published_model_keeps_its_own(
    tiny_bert, mtsamples, tmp_path, monkeypatch
):
    built = []
    real_build = mlm.build_training

    def recording_build(*args, **kwargs):
        t = real_build(*args, **kwargs)
        built.append({m.dropout.p for m in t.raw.modules() if type(m).__name__ == "BertSelfAttention"})
        return t

    monkeypatch.setattr(mlm, "build_training", recording_build)
    own = json.loads((tiny_bert / "config.json").read_text())["attention_probs_dropout_prob"]
    assert own == 0.1
    out = make_mlm_run(tmp_path / "run", mtsamples)
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=1"))  # the default: none
    assert built == [{0.0}]
    assert json.loads((out / "mlm/model/config.json").read_text())["attention_probs_dropout_prob"] == own
    with pytest.raises(MedclfError, match=r"mlm.attention_dropout: 0.0 there, null now; overwrite=true starts mlm"):
        mlm.run(mlm_spec(out, tiny_bert, "max_steps=1", "attention_dropout=null"))
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=1", "attention_dropout=null", "overwrite=true"))  # the checkpoint's
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=1", "attention_dropout=0.2", "overwrite=true"))
    assert built[1:] == [{own}, {0.2}]
    assert json.loads((out / "mlm/model/config.json").read_text())["attention_probs_dropout_prob"] == own


def test_inputs_are_checked_before_training(tiny_bert, mtsamples, tmp_path):
    out = make_mlm_run(tmp_path / "run", mtsamples)
    with pytest.raises(MedclfError, match=r"mlm\.max_length: 256 is above"):
        mlm.run(mlm_spec(out, tiny_bert, "max_length=256"))
    with pytest.raises(MedclfError, match=r"mlm\.batch_size: 800 blocks per step"):
        mlm.run(mlm_spec(out, tiny_bert, "batch_size=800", "micro_batch_size=8"))
    assert not (out / "mlm" / "model").exists()


@pytest.mark.slow
def test_changed_optimizer_settings_are_refused_naming_each_key_and_overwrite_starts_over(
    tiny_bert, mtsamples, tmp_path, capsys
):
    # The case: a checkpoint at step 3 made with lr=1e-4, re-run with another lr, warm-up and length.
    out = make_mlm_run(tmp_path / "run", mtsamples, train_rows=2)
    base = ["mlm", f"out={out}", f"model={tiny_bert}", *TINY_MLM_ARGS, "max_length=32", "micro_batch_size=8"]
    cli.main([*base, "lr=1e-4", "max_steps=3", "checkpoint_every=3"])
    shutil.rmtree(out / "mlm" / "model")
    (out / "mlm" / "job.json").unlink()  # as if stopped after its step-3 checkpoint: no model, no record
    before = tree(out / "mlm" / "checkpoints")
    code, line = run_cli([*base, "lr=5e-3", "warmup_ratio=0.5", "max_steps=6"], capsys)
    assert code == 2
    for changed in ("lr=0.0001 there, 0.005 now", "warmup_ratio=0.06 there, 0.5 now", "max_steps=3 there, 6 now"):
        assert changed in line, line
    assert "overwrite=true to start over" in line and "epochs=" not in line
    assert tree(out / "mlm" / "checkpoints") == before and not (out / "mlm" / "model").exists()
    # overwrite=true (resume left at auto) starts over with the new settings
    cli.main([*base, "lr=5e-3", "warmup_ratio=0.5", "max_steps=2", "checkpoint_every=3", "overwrite=true"])
    assert checkpoint.list_steps(str(out / "mlm" / "checkpoints")) == [2]


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_is_not_continued(tiny_bert, mtsamples, tmp_path):
    out = make_mlm_run(tmp_path / "run", mtsamples)
    mlm.run(mlm_spec(out, tiny_bert, "max_steps=2", "checkpoint_every=1"))
    shutil.rmtree(out / "mlm" / "model")
    (out / "mlm" / "job.json").unlink()  # as if interrupted after its checkpoints: no model, no record
    with pytest.raises(MedclfError, match="max_length=64 there, 32 now"):
        mlm.run(mlm_spec(out, tiny_bert, "max_steps=2", "max_length=32"))


@pytest.mark.slow
def test_minilm_on_the_real_data(minilm, prepared, tmp_path, caplog):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "run"
    shutil.copytree(prepared / "prepare", out / "prepare")
    caplog.set_level(logging.INFO)
    mlm.run(
        config.load(
            "mlm",
            None,
            [
                f"out={out}",
                f"model={minilm}",
                "max_length=128",
                "batch_size=4",
                "micro_batch_size=2",
                "max_steps=3",
                "eval_blocks=8",
                "lr=1e-4",
            ],
        )
    )
    assert "has no masked-LM head weights; initialised" in caplog.text
    metrics = json.loads((out / "mlm" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_blocks"] > 5000
    assert 0 < metrics["val_after"]["loss"] < 20
    model = AutoModelForMaskedLM.from_pretrained(out / "mlm" / "model")
    assert model.config.max_position_embeddings == 512


# ---------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigusr1_saves_a_checkpoint_exits_75_and_resumes_exactly(tiny_bert, mtsamples, tmp_path):
    whole, stopped = make_mlm_run(tmp_path / "whole", mtsamples), make_mlm_run(tmp_path / "stopped", mtsamples)
    args = ["max_steps=8", "checkpoint_every=100"]
    mlm.run(mlm_spec(whole, tiny_bert, *args))
    command = [sys.executable, "-m", "medclf", "mlm", f"out={stopped}", f"model={tiny_bert}", *TINY_MLM_ARGS, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDCLF_TEST_STEP_SLEEP": "0.5"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    deadline = time.time() + 120
    while "step 2/8" not in seen and time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen += line
    process.send_signal(signal.SIGUSR1)
    seen += process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, seen[-2000:]
    root = str(stopped / "mlm" / "checkpoints")
    latest = checkpoint.find_latest(root)
    assert latest is not None and 2 <= int(latest.rsplit("-", 1)[1]) < 8
    assert not (stopped / "mlm" / "model").exists()
    mlm.run(mlm_spec(stopped, tiny_bert, *args))
    assert_same_weights(weights(whole), weights(stopped))
