"""Shared fixtures: the real assets shipped with the project, and a tiny BERT built here (never downloaded).

The raw data is `data/mtsamples.csv.xz` in the repository and MiniLM is the package of the `minilm`
extra; `MEDCLF_SHARED=/path/to/shared` (with data/mtsamples.csv and models/all-MiniLM-L6-v2) overrides both.
"""

from __future__ import annotations

import lzma
import os
import pathlib

import pytest

from tests.helpers import REPO, make_tiny_bert
from tests.s3server import s3, s3_server  # noqa: F401 - moto S3 server fixtures for any test


def asset(shipped: pathlib.Path, *override: str) -> pathlib.Path:
    """A real asset: the shipped one, or the file under MEDCLF_SHARED when set; fails loudly when missing."""
    shared = os.environ.get("MEDCLF_SHARED")
    path = pathlib.Path(shared).joinpath(*override) if shared else shipped
    if not path.exists():
        pytest.fail(f"missing asset {path} (MEDCLF_SHARED={shared!r})")
    return path


SHIPPED_DATA = REPO / "data" / "mtsamples.csv.xz"


@pytest.fixture(scope="session")
def mtsamples(tmp_path_factory) -> pathlib.Path:
    """The raw CSV, decompressed once: tests copy, cut and corrupt its bytes as a user's file."""
    if os.environ.get("MEDCLF_SHARED"):
        return asset(SHIPPED_DATA, "data", "mtsamples.csv")
    plain = tmp_path_factory.mktemp("data") / "mtsamples.csv"
    plain.write_bytes(lzma.decompress(asset(SHIPPED_DATA).read_bytes()))
    return plain


@pytest.fixture(scope="session")
def minilm() -> pathlib.Path:
    from medclf import models

    if os.environ.get("MEDCLF_SHARED"):
        return asset(REPO, "models", "all-MiniLM-L6-v2")
    return pathlib.Path(models.resolve("all-MiniLM-L6-v2"))


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
