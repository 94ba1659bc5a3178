"""The installed `medclf` console script: version flags."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

import medclf

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_console(*args: str) -> subprocess.CompletedProcess:
    # The console script must import this checkout's package, whatever the editable install points at.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(["medclf", *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag_prints_the_package_version(flag):
    done = run_console(flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"medclf {medclf.__version__}\n"
    assert done.stderr == ""
    assert re.fullmatch(r"\d+\.\d+\.\d+", medclf.__version__)


def test_version_is_defined_once():
    # pyproject reads the version from medclf.__version__ instead of repeating it.
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert re.search(r'^version = \{ attr = "medclf.__version__" \}$', pyproject, re.M)
    assert not re.search(r'^version = "', pyproject, re.M)
