"""The Slurm templates, submitted as users submit them, on a real two-node Slurm cluster on this host.

tests/slurm/start.sh starts munged, slurmctld and two slurmd (n1, n2); the jobs run the tiny
spec on CPU ranks (MEDCLF_CPU=1, gloo) through slurm/*.sbatch and slurm/submit_pipeline.sh.
When the cluster cannot start, the tests fail with the reason; nothing is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = REPO / "slurm"
CLUSTER = REPO / "tests" / "slurm"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS = 8
# What the templates and the submit script read from the environment: only the tests set these.
TEMPLATE_ENV = {
    "JOB",
    "SPEC",
    "OUT",
    "GPUS_PER_NODE",
    "MEDCLF_CPU",
    "ACCELERATE_CONFIG",
    "MLM_NODES",
    "SBATCH_EXTRA",
    "MEDCLF_TEST_STEP_SLEEP",
}


@dataclasses.dataclass
class Cluster:
    dir: pathlib.Path
    env: dict

    def sbatch(self, *args: str, **env: str) -> str:
        """Submit with the given options and script arguments; the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *args], env=self.env | env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"sbatch {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its key=value fields."""
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"scontrol show job {job_id}: {done.stderr.strip()}"
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait(self, job_id: str, timeout: float = 180, while_pending=None) -> dict:
        """Poll until the job has finished (sbatch --wait backs off to tens of seconds); its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields["JobState"] in FINISHED:
                return fields
            if fields["JobState"] == "PENDING" and while_pending:
                while_pending(fields)
            time.sleep(0.3)
        pytest.fail(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}\n{self.log(job_id)[-3000:]}")

    def log(self, job_id: str) -> str:
        logs = list(self.dir.glob(f"logs/*-{job_id}.log"))
        return logs[0].read_text(errors="replace") if logs else f"(no log for job {job_id})"

    def preempt_after(self, job_id: str, checkpoints: pathlib.Path, step: str) -> None:
        """Once `latest` under `checkpoints` names `step`, USR1 to the job's steps: what Slurm does
        before a time limit with --signal=USR1@N."""
        latest, deadline = checkpoints / "latest", time.monotonic() + 300
        while not (latest.exists() and latest.read_text().strip() == step):
            assert time.monotonic() < deadline, f"no {step} checkpoint after 300 s:\n{self.log(job_id)[-3000:]}"
            assert self.job(job_id)["JobState"] not in FINISHED, self.log(job_id)[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", job_id], env=self.env, check=True, timeout=30)

    def wait_requeued(self, job_id: str) -> tuple[dict, str]:
        """Wait for a preempted job through its requeue (Slurm holds a requeued job ~120 s: once it is
        pending again, it is let start in 3 s) to completion; its fields and log, once checked that
        it completed after one requeue."""

        def start_soon(fields: dict) -> None:
            if fields["Restarts"] != "0" and not started:
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], env=self.env, check=True, timeout=30
                )
                started.append(True)

        started: list = []
        fields = self.wait(job_id, timeout=300, while_pending=start_soon)
        self.assert_completed(job_id, fields)
        log = self.log(job_id)
        assert fields["Restarts"] == "1", f"the job was not requeued:\n{log[-3000:]}"
        assert "stopped after a checkpoint: requeueing" in log and f"job {job_id} restart 1 " in log, log[-3000:]
        return fields, log

    def assert_completed(self, job_id: str, fields: dict) -> None:
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), (
            f"job {job_id} {fields['JobState']} exit {fields['ExitCode']}:\n{self.log(job_id)[-4000:]}"
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(CLUSTER / "start.sh"), str(folder)], capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER / "stop.sh"), str(folder)], timeout=120)
        pytest.fail(f"the Slurm test cluster did not start (tests/slurm/start.sh):\n{started.stdout}{started.stderr}")
    (folder / "logs").mkdir()
    # The jobs inherit this environment (sbatch --export=ALL): this Python first on PATH, CPU ranks,
    # and nothing of an outer Slurm job or a user's sbatch defaults (pytest may itself run under Slurm).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k not in TEMPLATE_ENV
    }
    env |= {
        "SLURM_CONF": str(folder / "slurm.conf"),
        "MEDCLF_CPU": "1",
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    yield Cluster(folder, env)
    subprocess.run(["bash", str(CLUSTER / "stop.sh"), str(folder)], timeout=120)


@pytest.fixture(scope="module")
def spec(tmp_path_factory, tiny_bert, mtsamples) -> pathlib.Path:
    """The tiny spec (tiny BERT, 64 tokens, 8 steps), its lr high enough that the loss moves.

    The model has no dropout: each rank draws its own dropout masks, so with dropout a run on two
    ranks is a different (equally valid) run, not the same one to float tolerance.
    """
    folder = tmp_path_factory.mktemp("slurm-spec")
    model = shutil.copytree(tiny_bert, folder / "tiny-bert-no-dropout")
    model_config = json.loads((model / "config.json").read_text())
    model_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(model_config))
    text = {
        "seed": 7,
        "prepare": {"input": str(mtsamples), "sample_notes": 200},
        "mlm": {
            "model": str(model),
            "max_length": 64,
            "max_steps": STEPS,
            "batch_size": 8,
            "micro_batch_size": 4,
            "lr": 3.0e-3,
            "warmup_ratio": 0.0,
            "checkpoint_every": 4,
            "log_every": 1,
            "eval_blocks": 16,
        },
        "head": {"max_length": 64, "epochs": 2, "encode_batch_size": 32},
        "compare": {"seeds": 2, "bootstrap": 200},
    }
    path = folder / "tiny-slurm.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory, spec) -> pathlib.Path:
    """A run folder holding prepare/ for the spec, copied into each mlm run."""
    from medclf import config, prepare

    out = tmp_path_factory.mktemp("slurm-prepared")
    prepare.run(config.load("prepare", spec.read_text(), [f"out={out}"]))
    return out


def new_run(prepared_run: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    shutil.copytree(prepared_run / "prepare", folder / "prepare")
    return folder


def submit_mlm(
    cluster: Cluster, template: str, out: pathlib.Path, spec: pathlib.Path, *, nodes: int, procs: int, **env: str
) -> str:
    return cluster.sbatch(
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        f"--output={cluster.dir}/logs/%x-%j.log",
        f"--export=ALL,OUT={out},GPUS_PER_NODE={procs}",
        str(SLURM / template),
        str(spec),
        **env,
    )


def metrics(out: pathlib.Path) -> dict:
    return json.loads((out / "mlm" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("slurm-runs")


@pytest.fixture(scope="module")
def submitted(cluster, spec, prepared_run, runs_dir) -> dict:
    """Jobs submitted up front, so that both nodes stay busy while the tests watch theirs.

    2 nodes × 1 process, then slurm/submit_pipeline.sh, whose mlm job (one node × 2 processes) is
    also the two-process run the other tests compare with.
    """
    two_nodes = new_run(prepared_run, runs_dir / "2x1")
    two_nodes_job = submit_mlm(cluster, "multi_node.sbatch", two_nodes, spec, nodes=2, procs=1)
    out = runs_dir / "pipeline"
    return {"2x1": (two_nodes, two_nodes_job), "pipeline": (out, submit_pipeline(cluster, spec, out))}


def submit_pipeline(cluster: Cluster, spec: pathlib.Path, out: pathlib.Path) -> dict[str, str]:
    """slurm/submit_pipeline.sh with mlm on one node × 2 processes: {job name: id}."""
    done = subprocess.run(
        ["bash", str(SLURM / "submit_pipeline.sh"), str(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env
        | {"OUT": str(out), "GPUS_PER_NODE": "2", "SBATCH_EXTRA": f"--output={cluster.dir}/logs/%x-%j.log"},
    )
    assert done.returncode == 0, done.stderr
    jobs = dict(line.split() for line in done.stdout.splitlines())
    assert list(jobs) == ["prepare", "mlm", "head-pretrained", "head-adapted", "compare"]
    return jobs


def two_process_run(cluster: Cluster, submitted: dict) -> pathlib.Path:
    out, jobs = submitted["pipeline"]
    cluster.assert_completed(jobs["mlm"], cluster.wait(jobs["mlm"], timeout=300))
    return out


def test_preempted_job_checkpoints_requeues_and_ends_with_the_uninterrupted_weights(
    cluster, submitted, spec, prepared_run, runs_dir
):
    out = new_run(prepared_run, runs_dir / "preempted")
    # One second per step, so the signal lands mid-training: after the step-4 checkpoint, before step 8.
    job_id = submit_mlm(cluster, "single_node.sbatch", out, spec, nodes=1, procs=2, MEDCLF_TEST_STEP_SLEEP="1")
    cluster.preempt_after(job_id, out / "mlm" / "checkpoints", "step-0000004")
    cluster.wait_requeued(job_id)
    # The stop came between checkpoints (every 4 steps): the job saved where it stopped.
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "mlm" / "checkpoints").glob("step-*"))
    assert any(4 < step < STEPS for step in saved), f"no checkpoint between steps 4 and {STEPS}: {saved}"
    uninterrupted = two_process_run(cluster, submitted)
    run, reference = metrics(out), metrics(uninterrupted)
    assert run["world_size"] == 2 and run["val_after"] == reference["val_after"]
    weights = load_file(out / "mlm" / "model" / "model.safetensors")
    expected = load_file(uninterrupted / "mlm" / "model" / "model.safetensors")
    assert weights.keys() == expected.keys()
    different = [k for k in weights if not torch.equal(weights[k], expected[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"


# A fine-tuning head (frozen: false) on the tiny spec: 2 epochs of ~20 steps, a checkpoint every 4.
FINE_TUNE = ["head.freeze=false", "head.name=ft", "head.windows=1", "head.batch_size=8", "head.checkpoint_every=4"]
FINE_TUNE += ["head.keep_last=100"]


def submit_head(cluster: Cluster, out: pathlib.Path, spec: pathlib.Path, *, procs: int, **env: str) -> str:
    return cluster.sbatch(
        "--nodes=1",
        "--gpus-per-node=0",
        f"--output={cluster.dir}/logs/%x-%j.log",
        f"--export=ALL,JOB=head,OUT={out},GPUS_PER_NODE={procs}",
        str(SLURM / "single_node.sbatch"),
        str(spec),
        *FINE_TUNE,
        **env,
    )


def test_a_preempted_fine_tuning_head_requeues_and_ends_with_the_uninterrupted_classifier(
    cluster, spec, prepared_run, runs_dir
):
    # Both on 2 processes (each rank draws its own dropout masks: each rank's RNG must come back).
    reference = new_run(prepared_run, runs_dir / "ft-whole")
    reference_job = submit_head(cluster, reference, spec, procs=2)
    out = new_run(prepared_run, runs_dir / "ft-preempted")
    job_id = submit_head(cluster, out, spec, procs=2, MEDCLF_TEST_STEP_SLEEP="0.5")
    checkpoints = out / "head-ft" / "checkpoints"
    cluster.preempt_after(job_id, checkpoints, "step-0000004")
    _, log = cluster.wait_requeued(job_id)
    assert "resumed from " in log, log[-3000:]
    # The ranks stopped mid-training, and saved where they stopped.
    stopped_at, total = map(int, re.search(r"stopped at step (\d+)/(\d+)", log).groups())
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert 4 < stopped_at < total and stopped_at in saved and saved[-1] == total, (stopped_at, total, saved)

    cluster.assert_completed(reference_job, cluster.wait(reference_job, timeout=300))
    for name in ("head.safetensors", "encoder/model.safetensors"):
        weights = load_file(out / "head-ft" / "model" / name)
        expected = load_file(reference / "head-ft" / "model" / name)
        assert weights.keys() == expected.keys()
        different = [k for k in weights if not torch.equal(weights[k], expected[k])]
        assert not different, f"{name}: resumed weights differ from the uninterrupted run's: {different[:5]}"
    run, whole = (json.loads((r / "head-ft" / "metrics.json").read_text()) for r in (out, reference))
    assert run["accuracy"] == whole["accuracy"] and run["f1_weighted"] == whole["f1_weighted"]


def test_compare_seeds_as_an_array_are_gathered_into_the_comparison_one_job_makes(
    cluster, spec, prepared_run, runs_dir
):
    # Two encoders without an mlm run: the tiny model, named twice (the plumbing is what is tested).
    encoders = f"compare.encoders=[pretrained, {spec.parent / 'tiny-bert-no-dropout'}]"
    out = new_run(prepared_run, runs_dir / "compare-array")
    common = ["--nodes=1", "--gpus-per-node=0", f"--output={cluster.dir}/logs/%x-%j.log"]
    common += [f"--export=ALL,JOB=compare,OUT={out},GPUS_PER_NODE=1", str(SLURM / "single_node.sbatch"), str(spec)]
    array = cluster.sbatch("--array=0-1", *common, encoders)
    gather = cluster.sbatch(f"--dependency=afterok:{array}", *common, encoders)

    from medclf import compare, config

    reference = new_run(prepared_run, runs_dir / "compare-one-job")
    compare.run(config.load("compare", spec.read_text(), [f"out={reference}", encoders]))

    fields = cluster.wait(gather, timeout=300)
    cluster.assert_completed(gather, fields)
    log = cluster.log(gather)
    assert log.count("its task's heads read") == 2, log[-3000:]  # the gathering job trained no head
    summaries = [json.loads((run / "comparison.json").read_text()) for run in (out, reference)]
    for summary in summaries:
        summary["settings"].pop("validation")  # the run folder's path
    assert summaries[0] == summaries[1]


def test_ranks_on_one_node_and_across_two_nodes_match_one_process(cluster, submitted, spec, prepared_run, runs_dir):
    two_nodes, job_id = submitted["2x1"]
    # The reference: one process, in this process, while Slurm runs the others.
    from medclf import config, mlm

    one = new_run(prepared_run, runs_dir / "1x1")
    mlm.run(config.load("mlm", spec.read_text(), [f"out={one}"]))
    reference = metrics(one)
    assert reference["world_size"] == 1 and reference["steps"] == STEPS
    # The comparison means something only if training moved the loss well beyond the tolerance.
    moved = reference["val_before"]["loss"] - reference["val_after"]["loss"]
    assert moved > 0.05, f"{STEPS} steps barely changed the validation loss ({moved:.2g}); the test would prove nothing"

    fields = cluster.wait(job_id, timeout=300)
    cluster.assert_completed(job_id, fields)
    assert fields["NodeList"] == "n[1-2]", fields["NodeList"]
    runs = {"1 node × 2 processes": two_process_run(cluster, submitted), "2 nodes × 1 process": two_nodes}
    for name, out in runs.items():
        run = metrics(out)
        assert run["world_size"] == 2, f"{name}: ran with world size {run['world_size']}"
        assert run["steps"] == STEPS
        assert run["val_after"]["loss"] == pytest.approx(reference["val_after"]["loss"], rel=1e-5), name


def test_pipeline_chain_runs_in_dependency_order_and_writes_the_comparison(cluster, submitted):
    out, jobs = submitted["pipeline"]
    fields = {}
    for name, job_id in jobs.items():
        fields[name] = cluster.wait(job_id, timeout=300)
        cluster.assert_completed(job_id, fields[name])

    # Each job started only after the jobs it depends on had ended.
    def after(later: str, *earlier: str) -> None:
        for name in earlier:
            assert fields[later]["StartTime"] >= fields[name]["EndTime"], f"{later} started before {name} ended"

    after("mlm", "prepare")
    after("head-pretrained", "prepare")
    after("head-adapted", "mlm")
    after("compare", "head-pretrained", "head-adapted")
    assert metrics(out)["world_size"] == 2
    for name in ("head-pretrained", "head-adapted"):
        assert (out / name / "metrics.json").exists(), name
    comparison = (out / "comparison.md").read_text()
    assert "pretrained" in comparison and "adapted" in comparison


def test_the_pipeline_chain_submitted_again_completes_and_rewrites_nothing(cluster, submitted, spec):
    out, jobs = submitted["pipeline"]
    for job_id in jobs.values():
        cluster.assert_completed(job_id, cluster.wait(job_id, timeout=300))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    for name, job_id in submit_pipeline(cluster, spec, out).items():
        cluster.assert_completed(job_id, cluster.wait(job_id, timeout=300))
        assert ": up to date (" in cluster.log(job_id), f"{name}:\n{cluster.log(job_id)[-3000:]}"
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "exits, expected",
    [
        ({0: (0, 75), 1: (0, 75)}, 75),  # all ranks stopped after the checkpoint: requeue
        ({0: (2, 75), 1: (0, 3)}, 1),  # a rank crashed (the other is then killed): no requeue
        ({0: (0, 75)}, 75),  # one process: accelerate's plain-subprocess path
    ],
)
def test_launcher_keeps_the_preempted_exit_status_and_only_that(tmp_path, exits, expected):
    # `accelerate launch` itself exits 1 for any failed worker; the templates requeue on 75 only.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, time\n"
        f"delay, status = {exits!r}[int(os.environ.get('RANK', '0'))]\n"
        "time.sleep(delay)\nsys.exit(status)\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = ["--multi_gpu"] if len(exits) > 1 else []
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medclf.launch",
            *ranks,
            "--num_processes",
            str(len(exits)),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(worker),
        ],
        env=os.environ | {"ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == expected, done.stderr[-2000:]
