"""The GPU benchmark script's CPU smoke test: the same code path at tiny sizes prints every figure."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_script_runs_on_cpu_and_prints_the_figures():
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--cpu", "--steps", "1", "--peak-seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    start, end = lines.index("{"), lines.index("}")
    figures = json.loads("\n".join(lines[start : end + 1]))
    assert figures["model"].startswith("BertConfig()") and figures["attention"] == "sdpa"
    assert figures["tokens"] == "random" and figures["device"] == "cpu" and figures["max_length"] == 64
    for key in ("ours_model_flops_per_s", "matmul_peak_flops", "share_of_matmul_peak", "ours_mfu_nominal", "ratio"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["nominal_peak_flops"] == 989e12
    # random notes of the real lengths: most of the padded stock batch is real text at 64 tokens
    assert 0 < figures["stock_padding_fill"] <= 1
    summary = lines[-1]
    for part in ("model FLOP/s", "MFU", "matmul peak", "of 989 T", "ratio to stock"):
        assert part in summary, (part, summary)


def test_batch_preparation_benchmark_runs_and_prints_its_ratios():
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "mlm_batch_prep.py"),
            "--notes",
            "60",
            "--steps",
            "4",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["benchmark"] == "mlm_batch_prep" and figures["steps"] == 4
    for run in ("in_process", "1_workers", "rank_of_2_1_workers"):
        assert figures[run]["tokens_per_s"] > 0 and figures[run]["vs_gpu"] > 0, run
