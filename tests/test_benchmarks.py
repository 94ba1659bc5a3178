"""Benchmark smoke tests (the GPU script on CPU, batch preparation, the whole job): tiny sizes, every figure."""

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


def test_whole_job_benchmark_runs_every_program_and_reports_each_ratio(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "mlm_job_vs_trainer.py"), "--notes", "8", "--max-length", "128"]
        + ["--eval-blocks", "2", "--step-steps", "1", "--workdir", str(tmp_path), "--output", str(tmp_path / "f.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "f.json").read_text())["allocators"]["default"]
    assert figures["medclf"]["real_tokens"] == figures["medclf-model-dropout"]["real_tokens"] > 0
    for key in ("ratio", "ratio_model_dropout", "model_step_tokens_per_s", "loop_vs_step"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    # each medclf run kept its own attention dropout: the default, and the model's own
    for program, value in (("medclf", 0.0), ("medclf-model-dropout", None)):
        record = json.loads((tmp_path / f"{program}-default-0" / "mlm" / "job.json").read_text())
        assert record["keys"]["mlm.attention_dropout"] == value, program
    assert "loop vs model step" in done.stdout.splitlines()[-1]
