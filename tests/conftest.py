"""Shared fixtures: the real assets in ../shared, and a tiny BERT built here (never downloaded)."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.helpers import REPO, make_tiny_bert
from tests.s3server import s3, s3_server  # noqa: F401 - moto S3 server fixtures for any test


def shared_dir() -> pathlib.Path:
    """MEDCLF_SHARED (set by .ci/run) or ../shared next to the checkout."""
    return pathlib.Path(os.environ.get("MEDCLF_SHARED", REPO.parent / "shared"))


def shared_file(*parts: str) -> pathlib.Path:
    """A real asset; a test that needs one fails loudly when it is missing."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.fail(f"missing shared asset {path} (MEDCLF_SHARED={os.environ.get('MEDCLF_SHARED')!r})")
    return path


@pytest.fixture(scope="session")
def mtsamples() -> pathlib.Path:
    return shared_file("data", "mtsamples.csv")


@pytest.fixture(scope="session")
def minilm() -> pathlib.Path:
    return shared_file("models", "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, mtsamples) -> pathlib.Path:
    """A tiny BertForMaskedLM with a WordPiece vocabulary trained on the real notes, saved as a folder."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), mtsamples)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, mtsamples) -> pathlib.Path:
    """The real data prepared with the default spec (grouped split); the run folder is returned."""
    from medclf import config, prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare.run(config.load("prepare", None, [f"out={out}", f"prepare.input={mtsamples}"]))
    return out
