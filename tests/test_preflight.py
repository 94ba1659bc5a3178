"""The multi-node preflight: every rank writes a marker under `out`, the main process must see them all.

Node-local storage is simulated honestly on one machine: two launchers (`--num_machines 2`, one
rank each, as the Slurm multi-node template starts them), each in its own working folder, with
a relative `out`, which then names a different folder on each "node" exactly as a node-local disk
does; and `memory://`, which is private to each process. The same two launchers with one absolute
`out` are the shared case.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from medclf import preflight, runtime, storage
from medclf.errors import EXIT_BAD_INPUT
from tests.helpers import REPO, TINY_MLM_ARGS, free_port, make_mlm_run

HOST = socket.gethostname()


# ---------------------------------------------------------------- the main process's verdict


def _mark(folder: pathlib.Path, token: str, rank: int) -> None:
    storage.write_json(str(folder / preflight.marker_name(token, rank)), {"rank": rank, "host": HOST})


def test_one_process_skips_it_without_touching_storage(monkeypatch):
    touched: list[str] = []
    for name in ("write_json", "exists", "remove"):
        monkeypatch.setattr(preflight.storage, name, lambda url, *args, name=name: touched.append(f"{name} {url}"))
    assert runtime.make_accelerator("memory://preflight-one-process").num_processes == 1
    assert touched == []


def test_the_verdict_needs_every_ranks_marker_of_this_attempt(tmp_path):
    ranks = [(0, "node-a", None), (1, "node-b", None)]
    _mark(tmp_path, "this", 0)
    _mark(tmp_path, "earlier", 1)  # left by a killed earlier attempt: not this one's
    refused = preflight.verdict_of(str(tmp_path), "out", "this", ranks)
    assert refused is not None and "\n" not in refused
    assert refused.startswith(f"out ({tmp_path}) is not one folder shared by all 2 processes")
    assert "(node-a) does not see the markers of rank 1 on node-b" in refused and "s3://" in refused
    _mark(tmp_path, "this", 1)
    assert preflight.verdict_of(str(tmp_path), "out", "this", ranks) is None


def test_a_rank_that_cannot_write_its_marker_is_named():
    ranks = [(0, "node-a", None), (1, "node-b", "run/.medclf-preflight-x-rank00001: permission denied")]
    refused = preflight.verdict_of("run", "out", "x", ranks)
    assert refused is not None
    assert refused.startswith("out (run): rank 1 on node-b cannot write its preflight marker (run/.medclf")


# ---------------------------------------------------------------- real launches over gloo


def _launcher(machines: int, rank: int, port: int, job_args: list[str], cwd: pathlib.Path) -> subprocess.Popen:
    """`python -m medclf.launch` (what the Slurm templates run) for one "node" of `machines`,
    with 2 // machines CPU ranks of `medclf mlm` in working folder `cwd`."""
    command = [sys.executable, "-m", "medclf.launch", "--multi_gpu", "--num_machines", str(machines)]
    command += ["--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(port), "--rdzv_backend", "static", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "-m", "medclf", "mlm", *job_args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_nodes(job_args: list[str], folders: list[pathlib.Path]) -> list[tuple[int, str]]:
    """(exit status, stderr) of each of two launchers, node i in working folder folders[i]."""
    port = free_port()
    launchers = [_launcher(2, i, port, job_args, folder) for i, folder in enumerate(folders)]
    stderrs = [p.communicate(timeout=300)[1] for p in launchers]
    return [(p.returncode, stderr) for p, stderr in zip(launchers, stderrs, strict=True)]


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("medclf mlm: error: ")]


def _markers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"{preflight.MARKER}*"))


@pytest.mark.slow
def test_a_node_local_out_is_refused_on_every_node_in_one_line(tiny_bert, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    # A marker of rank 1 left in node 0's folder by an earlier attempt must not pass for this one's.
    stale = nodes[0] / "run" / preflight.marker_name("0" * 32, 1)
    stale.parent.mkdir()
    stale.write_text("{}")
    results = _two_nodes(["out=run", f"model={tiny_bert}", *TINY_MLM_ARGS], nodes)

    lines = [_error_lines(stderr) for _, stderr in results]
    assert [code for code, _ in results] == [EXIT_BAD_INPUT] * 2, [stderr[-3000:] for _, stderr in results]
    assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1], lines
    assert "out (run) is not one folder shared by all 2 processes" in lines[0][0]
    assert f"does not see the markers of rank 1 on {HOST}" in lines[0][0] and "s3://" in lines[0][0]
    # Each rank removed its own marker; nothing else was written; the stale one is not ours to remove.
    assert _markers(nodes[0]) == [stale.name] and list((nodes[1] / "run").iterdir()) == []
    assert [p.name for p in (nodes[0] / "run").iterdir()] == [stale.name]


@pytest.mark.slow
def test_a_shared_out_passes_on_two_nodes_and_keeps_no_markers(tiny_bert, mtsamples, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    out = make_mlm_run(tmp_path / "shared", mtsamples)
    results = _two_nodes([f"out={out}", f"model={tiny_bert}", *TINY_MLM_ARGS, "max_steps=2"], nodes)

    assert [code for code, _ in results] == [0, 0], [stderr[-3000:] for _, stderr in results]
    assert f"preflight: out ({out}) is seen by all 2 processes" in results[0][1]
    assert json.loads((out / "mlm" / "metrics.json").read_text())["world_size"] == 2
    assert _markers(out) == [] and _markers(nodes[0]) == _markers(nodes[1]) == []


@pytest.mark.slow
def test_two_ranks_on_a_memory_out_are_refused(tiny_bert, tmp_path):
    """memory:// is private to each process: what a user who sets it on two ranks must be told."""
    launcher = _launcher(1, 0, free_port(), ["out=memory://run", f"model={tiny_bert}", *TINY_MLM_ARGS], tmp_path)
    stderr = launcher.communicate(timeout=300)[1]
    lines = _error_lines(stderr)
    assert launcher.returncode == EXIT_BAD_INPUT, stderr[-3000:]
    assert lines and all(line == lines[0] for line in lines), lines
    assert "out (memory://run) is not one folder shared by all 2 processes" in lines[0]
    assert f"rank 1 on {HOST}" in lines[0] and "memory://)" in lines[0]
