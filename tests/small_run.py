"""A small run folder cut from the real prepared data, for tests of the head, evaluate and predict jobs."""

from __future__ import annotations

import pathlib
import shutil

import pandas as pd


def make_small_run(
    out: pathlib.Path, prepared: pathlib.Path, train_notes: int = 40, validation_notes: int = 16
) -> pathlib.Path:
    """<out>/prepare/ with the first N distinct notes of each split (all their copies, so some texts repeat)."""
    (out / "prepare").mkdir(parents=True, exist_ok=True)
    for name, notes in (("train.csv", train_notes), ("validation.csv", validation_notes)):
        df = pd.read_csv(prepared / "prepare" / name, dtype=str, keep_default_na=False)
        keep = df["text_id"].drop_duplicates().iloc[:notes]
        df[df["text_id"].isin(keep)].to_csv(out / "prepare" / name, index=False)
    shutil.copy(prepared / "prepare" / "labels.json", out / "prepare" / "labels.json")
    return out


def head_spec(out: pathlib.Path, encoder: pathlib.Path, *overrides: str):
    from medclf import config

    return config.load("head", None, [f"out={out}", f"mlm.model={encoder}", "head.max_length=64", *overrides])
