"""A real 2-rank CPU run through `accelerate launch` equals one process with the same global batch.

PLATFORM.md: `--cpu` alone gives ONE rank; `--multi_gpu` plus ACCELERATE_USE_CPU=1 gives two gloo
ranks. The run records its world size, and the test asserts it, so a silent fallback to two
independent single-process runs cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from medclf import manifest, mlm
from tests.helpers import REPO, TINY_MLM_ARGS, free_port, make_mlm_run, mlm_spec

pytestmark = pytest.mark.slow


def without_dropout(tiny_bert, folder):
    """Dropout draws differ between a rank and the same rows in one process; the batch arithmetic is what is tested."""
    import shutil

    shutil.copytree(tiny_bert, folder)
    model_config = json.loads((folder / "config.json").read_text())
    model_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(model_config))
    return folder


def test_two_ranks_match_one_process(tiny_bert, mtsamples, tmp_path):
    model = without_dropout(tiny_bert, tmp_path / "model")
    # micro-batch 2: one process accumulates 4 micro-batches per step, each of two ranks 2.
    # shard_rows=1: each rank tokenizes its own shards (of the 4 training notes) into the store both read.
    args = ["micro_batch_size=2", "max_steps=4", "checkpoint_every=2", "shard_rows=1"]
    one, two = make_mlm_run(tmp_path / "one", mtsamples), make_mlm_run(tmp_path / "two", mtsamples)
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
        "mlm",
        f"out={two}",
        f"model={model}",
        *TINY_MLM_ARGS,
        *args,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    mlm.run(mlm_spec(one, model, *args))

    m1 = json.loads((one / "mlm" / "metrics.json").read_text())
    m2 = json.loads((two / "mlm" / "metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    # The token stores are the same files, byte for byte, tokenized by one process or by two.
    stores = [
        {str(p.relative_to(out)): p.read_bytes() for p in (out / "cache").glob("tokens-*/*.npy")} for out in (one, two)
    ]
    assert stores[0] == stores[1] and len(stores[0]) == 2 * (4 + 2)  # 4 training shards, 2 validation
    assert abs(m1["first_step_loss"] - m2["first_step_loss"]) < 1e-5
    # Fixed evaluation masks: the same validation loss on one rank and on two.
    assert abs(m1["val_before"]["loss"] - m2["val_before"]["loss"]) < 1e-6
    assert m1["val_before"]["masked_tokens"] == m2["val_before"]["masked_tokens"]
    w1, w2 = (load_file(str(out / "mlm" / "model" / "model.safetensors")) for out in (one, two))
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5, msg=name)
    # Each rank saved its own RNG state into the same checkpoint.
    listing = manifest.verify(str(two / "mlm" / "checkpoints" / "step-0000004"))
    assert {"rng-rank00000.safetensors", "rng-rank00001.safetensors"} <= set(listing["files"])
