"""Checkpoints: exact round trip without pickle, manifest last, refusal of altered files, fallback, pruning."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from medclf import checkpoint, manifest
from medclf.errors import MedclfError


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def trained(seed=0):
    """A small model with tied weights, an AdamW that has taken steps, and a LambdaLR schedule."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))
    model[1].weight = model[0].weight  # tied, as BERT's decoder and word embeddings
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight], "weight_decay": 0.1}, {"params": [model[1].bias], "weight_decay": 0.0}], lr=1e-2
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    for _ in range(3):
        model(torch.randint(0, 20, (4,))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def save(accelerator, root, step, keep_last=5, **parts):
    model, optimizer, scheduler = parts.get("trained") or trained()
    return checkpoint.save(
        str(root),
        step,
        accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state={"epoch": 0, "position": step},
        spec_yaml="seed: 1\n",
        keep_last=keep_last,
    )


def test_state_trees_round_trip_with_tuples_int_keys_and_tensors():
    _, optimizer, scheduler = trained()
    for state in (optimizer.state_dict(), scheduler.state_dict()):
        tree, tensors = checkpoint.encode(state)
        json.dumps(tree)  # JSON all the way
        back = checkpoint.decode(json.loads(json.dumps(tree)), tensors)
        assert repr(back) == repr(state)


def test_save_and_load_restore_weights_optimizer_schedule_and_rng(accelerator, tmp_path):
    model, optimizer, scheduler = trained(seed=0)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    url = save(accelerator, tmp_path, 3, trained=(model, optimizer, scheduler))
    draws = (torch.rand(3), np.random.rand(3), random.random())
    manifest = json.loads((tmp_path / "step-0000003" / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "scheduler.safetensors",
        "rng-rank00000.safetensors",
        "state.json",
        "spec.yaml",
    }
    assert (tmp_path / "latest").read_text() == "step-0000003\n"
    assert not any(p.suffix == ".pt" or p.suffix == ".bin" for p in (tmp_path / "step-0000003").iterdir())

    fresh_model, fresh_optimizer, fresh_scheduler = trained(seed=1)
    state = checkpoint.load(url, accelerator, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert state["step"] == 3 and state["position"] == 3 and state["world_size"] == 1
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_model[1].weight is fresh_model[0].weight
    assert repr(fresh_optimizer.state_dict()) == repr(optimizer.state_dict())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


def test_an_altered_or_truncated_file_is_refused_by_name_and_the_previous_one_used(accelerator, tmp_path, caplog):
    save(accelerator, tmp_path, 1)
    save(accelerator, tmp_path, 2)
    newest = tmp_path / "step-0000002"
    data = (newest / "optimizer.safetensors").read_bytes()
    (newest / "optimizer.safetensors").write_bytes(data[:-7])
    with pytest.raises(MedclfError, match=r"step-0000002/optimizer\.safetensors: .* bytes, manifest says"):
        manifest.verify(str(newest))
    caplog.set_level(logging.WARNING)
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000001")
    assert "skipping checkpoint" in caplog.text and "optimizer.safetensors" in caplog.text

    (newest / "optimizer.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(MedclfError, match="SHA-256 differs"):
        manifest.verify(str(newest))


def test_a_save_is_invisible_until_its_manifest_is_written(accelerator, tmp_path, monkeypatch):
    save(accelerator, tmp_path, 1)
    monkeypatch.setenv(manifest.PAUSE_ENV, "1.5")
    saving = threading.Thread(target=save, args=(accelerator, tmp_path, 2))
    saving.start()
    deadline = time.time() + 30
    while not (tmp_path / "step-0000002" / "state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "step-0000002" / "model.safetensors").exists()
    assert not (tmp_path / "step-0000002" / "manifest.json").exists()
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000001")
    assert (tmp_path / "latest").read_text() == "step-0000001\n"
    saving.join()
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000002")


def test_only_the_last_k_complete_checkpoints_are_kept(accelerator, tmp_path):
    (tmp_path / "step-0000002").mkdir(parents=True)
    (tmp_path / "step-0000002" / "model.safetensors").write_bytes(b"half")  # an interrupted save
    for step in (1, 3, 4, 5):
        save(accelerator, tmp_path, step, keep_last=2)
    assert checkpoint.list_steps(str(tmp_path)) == [4, 5]
    with pytest.raises(MedclfError, match="incomplete checkpoint"):
        (tmp_path / "step-0000005" / "manifest.json").unlink()
        manifest.verify(str(tmp_path / "step-0000005"))
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000004")


def test_memory_urls_work_like_local_paths(accelerator):
    root = "memory://medclf-test/checkpoints"
    save(accelerator, root, 7)
    assert checkpoint.find_latest(root) == f"{root}/step-0000007"
    model, optimizer, scheduler = trained(seed=2)
    assert (
        checkpoint.load(f"{root}/step-0000007", accelerator, model=model, optimizer=optimizer, scheduler=scheduler)[
            "step"
        ]
        == 7
    )


def test_publish_dir_writes_the_manifest_after_the_files(tmp_path):
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    (local / "sub" / "weights.bin").write_bytes(b"12345")
    manifest.publish_dir(str(local), str(tmp_path / "model"))
    listing = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert set(listing["files"]) == {"config.json", "sub/weights.bin"}
    assert listing["files"]["sub/weights.bin"]["size"] == 5


def test_resume_starts_from_the_checkpoint_latest_names(accelerator, tmp_path, caplog):
    for step in (1, 2, 3):
        save(accelerator, tmp_path, step)
    assert (tmp_path / checkpoint.LATEST).read_text() == "step-0000003\n"
    (tmp_path / checkpoint.LATEST).write_text("step-0000002\n")  # e.g. killed between step 3's manifest and pointer
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000002")
    # the one it names fails verification: older verified ones, never the newer one it does not vouch for
    (tmp_path / "step-0000002" / "state.json").write_text("{}")
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000001")
    assert "step-0000002/state.json" in caplog.text
    # no readable pointer: the newest checkpoint that verifies
    (tmp_path / checkpoint.LATEST).write_text("garbage\n")
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000003")
    (tmp_path / checkpoint.LATEST).unlink()
    assert checkpoint.find_latest(str(tmp_path)) == str(tmp_path / "step-0000003")
