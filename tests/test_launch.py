"""medclf.launch gives CPU runs' workers the glibc malloc settings, unless the user set their own, and
its exit status tells a preemption (75) and a refusal (2) from a crash (1)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from medclf import launch


def _worker_sees(tmp_path, **env: str) -> str:
    """GLIBC_TUNABLES as a worker started by `python -m medclf.launch --cpu` sees it."""
    worker = tmp_path / "worker.py"
    worker.write_text("import os\nprint('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', '<unset>'))\n")
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    done = subprocess.run(
        [sys.executable, "-m", "medclf.launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no"]
        + ["--dynamo_backend", "no", str(worker)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return next(line for line in done.stdout.splitlines() if line.startswith("TUNABLES=")).partition("=")[2]


def test_a_cpu_run_gets_the_malloc_settings_and_a_users_own_are_kept(tmp_path):
    assert _worker_sees(tmp_path) == launch.CPU_MALLOC_TUNABLES
    assert _worker_sees(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"


@pytest.mark.parametrize(
    "cpu_flag, use_cpu_env, cuda, expected",
    [
        (False, "", True, False),  # a GPU run: left alone
        (True, "", True, True),  # --cpu on a GPU node
        (False, "1", True, True),  # ACCELERATE_USE_CPU=1 (the MEDCLF_CPU=1 Slurm path)
        (False, "", False, True),  # no GPU at all
    ],
)
def test_only_cpu_runs_get_the_settings(monkeypatch, cpu_flag, use_cpu_env, cuda, expected):
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: cuda)
    environ = {"ACCELERATE_USE_CPU": use_cpu_env} if use_cpu_env else {}
    launch.cpu_allocator_env(SimpleNamespace(cpu=cpu_flag), environ)
    assert environ.get("GLIBC_TUNABLES") == (launch.CPU_MALLOC_TUNABLES if expected else None)


@pytest.mark.parametrize(
    "codes, expected",
    [
        ([75], 75),  # every rank stopped after the checkpoint
        ([-15, 75], 75),  # ... or was stopped by the agent once one had
        ([2], 2),  # every rank refused the input (e.g. the preflight's node-local `out`)
        ([-15, 2], 2),
        ([2, 75], 1),  # a mix is a failure
        ([1, 2], 1),
        ([-9], 1),  # killed from outside
    ],
)
def test_the_launch_status_keeps_a_preemption_and_a_refusal_apart_from_a_crash(codes, expected):
    assert launch.job_status(codes) == expected
