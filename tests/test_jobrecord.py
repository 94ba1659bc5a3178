"""Every job is idempotent: up to date (nothing rewritten), differing (exit 2 naming each key with both
values), overwrite=true (starts that job over). prepare, mlm, evaluate and predict have the same checks
in their own test files; head and compare are checked here on a small run with a tiny BERT."""

from __future__ import annotations

import json

import pytest

from medclf import compare, config, head, jobrecord
from medclf.errors import MedclfError
from tests.helpers import head_spec, make_small_run, tree


def _record(keys: dict, inputs: dict) -> jobrecord.Record:
    return jobrecord.Record("compare", "memory://r/job.json", keys, inputs, [], [])


def test_differences_name_each_key_and_input_with_both_values():
    there = {"keys": {"compare.seeds": 5, "compare.encoders": ["pretrained", "adapted"]}, "inputs": {"a.csv": "1"}}
    now = _record({"compare.seeds": 3, "compare.encoders": ["pretrained", "adapted"]}, {"a.csv": "2", "b.csv": "3"})
    assert jobrecord.differences(there, now) == [
        "compare.seeds: 5 there, 3 now",
        "input a.csv: changed",
        "input b.csv: new",
    ]
    # a key that a later version started recording compares with its default, not with "missing"
    assert jobrecord.differences({"keys": {}, "inputs": {}}, _record({"compare.bootstrap": 10000}, {})) == []
    assert jobrecord.differences({"keys": {}, "inputs": {}}, _record({"compare.bootstrap": 5}, {})) == [
        "compare.bootstrap: 10000 there, 5 now"
    ]


def test_a_moved_key_compares_with_the_value_its_old_key_recorded():
    # mlm.text_column and predict.text_column became dataset.text_column: a record from before still matches
    there = {"keys": {"predict.text_column": "note"}, "inputs": {}}
    assert jobrecord.differences(there, _record({"dataset.text_column": "note"}, {})) == []
    assert jobrecord.differences(there, _record({"dataset.text_column": "text"}, {})) == [
        "dataset.text_column: note there, text now"
    ]
    assert jobrecord.differences({"keys": {"mlm.text_column": "transcription"}}, _record(DEFAULT_COLUMNS, {})) == []


def test_a_key_added_later_compares_with_what_runs_did_before_it():
    # Before mlm.attention_dropout (default 0) an adaptation kept the checkpoint's own: null, not 0.
    record = _record({"mlm.attention_dropout": 0.0}, {})
    assert jobrecord.differences({"keys": {}, "inputs": {}}, record) == ["mlm.attention_dropout: null there, 0.0 now"]
    assert jobrecord.differences({"keys": {}, "inputs": {}}, _record({"mlm.attention_dropout": None}, {})) == []


DEFAULT_COLUMNS = {"dataset.text_column": "transcription", "dataset.label_column": "medical_specialty"}


def test_the_columns_shape_every_job_that_reads_notes():
    for job in ("prepare", "mlm", "head", "compare", "evaluate", "predict"):
        assert "dataset.text_column" in jobrecord.KEYS[job], job
    for job in ("prepare", "head", "compare", "evaluate"):  # predict and mlm read no labels
        assert "dataset.label_column" in jobrecord.KEYS[job], job


def test_every_recorded_key_exists_in_the_spec():
    spec = config.RunSpec()
    for job in jobrecord.KEYS:
        jobrecord.keys(job, spec)  # raises AttributeError on a misspelt key


@pytest.mark.slow
def test_head_and_compare_are_up_to_date_differ_or_start_over(tmp_path, prepared, tiny_bert):
    out = make_small_run(tmp_path / "run", prepared)
    base = ["head.epochs=2", f"head.encoder={tiny_bert}"]

    def spec(job, *extra):
        return head_spec(out, tiny_bert, *base, *extra) if job == "head" else _compare_spec(out, tiny_bert, *extra)

    head.run(spec("head"))
    folder = out / f"head-{tiny_bert.name}"
    before = tree(folder), {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    head.run(spec("head", "head.encode_batch_size=5"))  # speed only: still up to date
    assert (tree(folder), {p: p.stat().st_mtime_ns for p in folder.rglob("*")}) == before
    with pytest.raises(MedclfError, match=r"job.json: head.epochs: 2 there, 3 now; overwrite=true starts head over"):
        head.run(spec("head", "head.epochs=3"))
    assert tree(folder) == before[0]
    head.run(spec("head", "head.epochs=3", "overwrite=true"))
    assert json.loads((folder / "job.json").read_text())["keys"]["head.epochs"] == 3

    compare.run(spec("compare"))
    record = out / "comparison.job.json"
    written = record.stat().st_mtime_ns, (out / "comparison.md").read_text()
    compare.run(spec("compare", "overwrite=true"))  # matches: overwrite=true leaves it alone
    assert (record.stat().st_mtime_ns, (out / "comparison.md").read_text()) == written
    with pytest.raises(MedclfError, match=r"compare.seeds: 2 there, 3 now; overwrite=true starts compare over"):
        compare.run(spec("compare", "compare.seeds=3"))
    compare.run(spec("compare", "compare.seeds=3", "overwrite=true"))
    assert len(json.loads((out / "comparison.json").read_text())["seeds"]) == 3


def _compare_spec(out, tiny_bert, *extra):
    args = [f"out={out}", f"mlm.model={tiny_bert}", "head.max_length=64", "head.epochs=2", "compare.seeds=2"]
    args += ["compare.bootstrap=200", f"compare.encoders=[pretrained, {tiny_bert}]"]
    return config.load("compare", None, [*args, *extra])
