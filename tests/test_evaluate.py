"""Metrics against hand-computed values, any-label accuracy, the report files, and the evaluate job."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medclf import config, evaluate, head, report, storage
from medclf.config import DatasetSpec
from medclf.errors import MedclfError
from tests.helpers import head_spec, make_small_run, tree

CLASSES = ["a", "b", "c"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_metrics_match_hand_computed_values():
    # a: tp 2 fp 0 fn 1 -> p 1, r 2/3, f1 0.8;  b: tp 1 fp 1 fn 1 -> 0.5 each;  c: tp 1 fp 1 fn 0 -> p 0.5, r 1, f1 2/3
    labels = [{"a"}, {"a"}, {"a", "b"}, {"b"}, {"b"}, {"c"}]  # row 3 (true a, predicted b) is also a "b" note
    m = report.metrics(CLASSES, Y_TRUE, Y_PRED, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_weighted"] == pytest.approx((3 * 1 + 2 * 0.5 + 1 * 0.5) / 6)
    assert m["recall_weighted"] == pytest.approx(4 / 6)
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["any_label_accuracy"] == pytest.approx(5 / 6)
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_any_label_sets_collect_every_copy_of_a_note_across_both_splits(tmp_path):
    (tmp_path / "prepare").mkdir()
    rows = lambda pairs: pd.DataFrame(  # noqa: E731
        {"text_id": [t for t, _ in pairs], "medical_specialty": [s for _, s in pairs], "transcription": "x"}
    )
    rows([("n1", "b"), ("n2", "c")]).to_csv(tmp_path / "prepare" / "train.csv", index=False)
    validation = rows([("n1", "a"), ("n3", "a"), ("n3", "c")])
    validation.to_csv(tmp_path / "prepare" / "validation.csv", index=False)
    assert report.note_labels(str(tmp_path), validation, DatasetSpec()) == [{"a", "b"}, {"a", "c"}, {"a", "c"}]


def test_report_files(tmp_path):
    report.write_report(str(tmp_path), "toy", CLASSES, Y_TRUE, Y_PRED, None, about={"model": "m"})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "m" and metrics["any_label_accuracy"] is None
    text = (tmp_path / "report.md").read_text()
    assert "| f1_weighted | 0.6778 |" in text and "| c | 0.5000 | 1.0000 | 0.6667 | 1 |" in text
    assert (tmp_path / "confusion.png").read_bytes().startswith(b"\x89PNG")


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_an_interrupted_or_altered_report_is_never_read_as_complete(tmp_path, monkeypatch):
    out = str(tmp_path / "report")
    with pytest.raises(MedclfError, match=r"incomplete report \(no manifest\.json\)"):
        report.read_metrics(out)
    write_bytes = storage.write_bytes

    def killed_at_the_report(url, data):  # the job dies once metrics.json and confusion.png are written
        if url.endswith("report.md"):
            raise Killed
        write_bytes(url, data)

    monkeypatch.setattr(storage, "write_bytes", killed_at_the_report)
    with pytest.raises(Killed):
        report.write_report(out, "toy", CLASSES, Y_TRUE, Y_PRED, None, about={})
    assert (tmp_path / "report" / "metrics.json").exists() and not report.is_complete(out)
    with pytest.raises(MedclfError, match="incomplete report"):
        report.read_metrics(out)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    written = report.write_report(out, "toy", CLASSES, Y_TRUE, Y_PRED, None, about={})
    assert report.is_complete(out) and report.read_metrics(out)["accuracy"] == written["accuracy"]

    # a rerun over a complete report, killed midway: the old manifest went first, so it is incomplete again
    monkeypatch.setattr(storage, "write_bytes", killed_at_the_report)
    with pytest.raises(Killed):
        report.write_report(out, "toy", CLASSES, Y_TRUE, Y_TRUE, None, about={})
    assert not report.is_complete(out)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    report.write_report(out, "toy", CLASSES, Y_TRUE, Y_PRED, None, about={})
    (tmp_path / "report" / "report.md").write_text("edited")
    with pytest.raises(MedclfError, match=r"report\.md: \d+ bytes, manifest says"):
        report.read_metrics(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared, tiny_bert):
    out = make_small_run(tmp_path_factory.mktemp("evaluate") / "run", prepared)
    head.run(head_spec(out, tiny_bert, "epochs=2"))
    return out


@pytest.mark.slow
def test_evaluate_job_reuses_the_cached_features_and_agrees_with_the_head_report(trained):
    spec = config.load("evaluate", None, [f"out={trained}", "model=pretrained"])
    evaluate.run(spec)
    ours = report.read_metrics(str(trained / "evaluate" / "pretrained"))  # complete: its manifest verifies
    heads = report.read_metrics(str(trained / "head-pretrained"))
    assert ours["confusion_matrix"] == heads["confusion_matrix"]
    for key in report.HEADLINE:
        assert ours[key] == pytest.approx(heads[key])
    assert len(list((trained / "features").iterdir())) == 2  # nothing new was encoded
    before = tree(trained / "evaluate")
    evaluate.run(config.load("evaluate", None, [f"out={trained}", "model=pretrained", "batch_size=7"]))  # up to date
    assert tree(trained / "evaluate") == before
    data = trained / "other.csv"
    data.write_bytes((trained / "prepare" / "validation.csv").read_bytes())
    with pytest.raises(
        MedclfError, match=r"pretrained/job.json: input other.csv: new; overwrite=true starts evaluate over"
    ):
        evaluate.run(config.load("evaluate", None, [f"out={trained}", "model=pretrained", f"data={data}"]))


@pytest.mark.slow
def test_evaluate_rejects_data_the_classifier_does_not_know(trained, tmp_path):
    model = trained / "head-pretrained" / "model"
    bad = tmp_path / "bad.csv"
    df = pd.read_csv(trained / "prepare" / "validation.csv", dtype=str, keep_default_na=False)
    df.loc[4, "medical_specialty"] = "Neurology"
    df.to_csv(bad, index=False)
    with pytest.raises(MedclfError, match=r"bad.csv: row 5: label 'Neurology' is not one of the classes"):
        evaluate.run(config.load("evaluate", None, [f"out={tmp_path}", f"model={model}", f"data={bad}"]))

    other = tmp_path / "other"
    (other / "prepare").mkdir(parents=True)
    (other / "prepare" / "labels.json").write_text(json.dumps({"classes": ["Surgery", "Neurology"]}))
    with pytest.raises(MedclfError, match=r"classifier classes .* do not match .*labels.json"):
        evaluate.run(config.load("evaluate", None, [f"out={other}", f"model={model}"]))
