"""`medclf run`: the whole experiment in one command, from a fresh clone with nothing beside it, and
idempotent: again is a no-op, a changed key is refused by name, overwrite=true re-runs only what changed."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from medclf import cli, compare, config, head, mlm, pipeline, prepare
from medclf.errors import Preempted
from tests.helpers import REPO


def test_help_lists_the_keys_of_every_stage(capsys):
    with pytest.raises(SystemExit) as ended:
        cli.main(["run", "--help"])
    shown = capsys.readouterr().out
    assert ended.value.code == 0
    for key in ("prepare.input", "mlm.max_steps", "head.max_length", "compare.seeds", "overwrite"):
        assert f"    {key} = " in shown, key


def test_stages_run_in_order_and_a_signal_stops_after_the_stage_it_lands_in(monkeypatch, tmp_path):
    spec = config.load("run", None, [f"out={tmp_path}", "prepare.input=x.csv"])
    ran: list[str] = []

    def job(name, signalled=False):
        def run(stage_spec):
            ran.append(name if name != "head" else f"head {stage_spec.head.encoder}")
            if signalled:
                os.kill(os.getpid(), signal.SIGTERM)  # turned into a flag; the stage ends normally

        return run

    for module, name in ((prepare, "prepare"), (mlm, "mlm"), (compare, "compare")):
        monkeypatch.setattr(module, "run", job(name))
    monkeypatch.setattr(head, "run", job("head", signalled=True))
    with pytest.raises(Preempted, match="stopped after head pretrained"):
        pipeline.run(spec)
    assert ran == ["prepare", "mlm", "head pretrained"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


# ---------------------------------------------------------------- end to end, from a fresh clone


def _files(out: pathlib.Path) -> dict[str, tuple[str, int]]:
    """Every file under `out`: (SHA-256, modification time in ns)."""
    return {
        str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_fresh_clone_runs_the_tiny_pipeline_and_again_is_a_no_op(tmp_path):
    clone = tmp_path / "alone" / "medclf"  # nothing beside it: no ../shared
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MEDCLF_SHARED"} | {"PYTHONPATH": str(clone)}

    def medclf_run(*extra):
        argv = [sys.executable, "-m", "medclf", "run", "jobs/tiny-cpu.yaml", f"out={out}", *extra]
        return subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)

    # (a) the whole experiment: it ends with the verdict and where comparison.md is
    first = medclf_run()
    assert first.returncode == 0, first.stderr[-3000:]
    verdict = json.loads((out / "comparison.json").read_text())["verdict"]
    assert first.stdout.splitlines()[-2:] == [verdict, str(out / "comparison.md")]
    made = _files(out)

    # (b) again: every stage up to date, no file rewritten
    again = medclf_run()
    assert again.returncode == 0, again.stderr[-3000:]
    up_to_date = re.findall(r"medclf\.jobrecord: (\w+): up to date", again.stderr)
    assert up_to_date == ["prepare", "mlm", "head", "head", "compare"], again.stderr[-3000:]
    assert _files(out) == made

    # (c) a changed key: exit 2, one line naming it with both values, nothing changed
    changed = medclf_run("compare.seeds=3")
    assert changed.returncode == 2
    errors = [line for line in changed.stderr.splitlines() if ": error: " in line]
    record = out / "comparison.job.json"
    assert errors == [f"medclf run: error: {record}: compare.seeds: 2 there, 3 now; overwrite=true starts compare over"]
    assert _files(out) == made

    # (d) overwrite=true re-runs compare only
    redone = medclf_run("overwrite=true", "compare.seeds=3")
    assert redone.returncode == 0, redone.stderr[-3000:]
    now = _files(out)
    compare_files = {"comparison.md", "comparison.json", "comparison.job.json"}
    assert {k: v for k, v in now.items() if k not in compare_files} == {
        k: v for k, v in made.items() if k not in compare_files
    }
    assert len(json.loads((out / "comparison.json").read_text())["seeds"]) == 3
