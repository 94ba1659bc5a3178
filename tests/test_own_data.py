"""Your own data: a CSV with other column names and another label set runs the whole pipeline.

A hospital-style export (`note_id`, `summary`, `note_text`, `department`; departments instead of
MTSamples' specialties) goes through `medclf run` with a tiny BERT, one setting naming its columns
(dataset.text_column, dataset.label_column); then evaluate and predict read the user's own files, with
their own column arrangement.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medclf import config, evaluate, pipeline, predict
from medclf.errors import MedclfError
from tests.helpers import tree

pytestmark = pytest.mark.slow

# Specialty -> department: the label set of the user's file. Dermatology (29 of the 1,209 rows)
# is under the default 5% rule, so the run has four classes.
DEPARTMENTS = {
    "Cardiovascular / Pulmonary": "cardiology",
    "Orthopedic": "orthopaedics",
    "Gastroenterology": "gastroenterology",
    "Neurology": "neurology",
    "Dermatology": "dermatology",
}
COLUMNS = ["dataset.text_column=note_text", "dataset.label_column=department"]


@pytest.fixture(scope="module")
def export(tmp_path_factory, mtsamples):
    """The user's CSV: MTSamples rows re-dressed, no `transcription` or `medical_specialty` column."""
    raw = pd.read_csv(mtsamples, dtype=str, keep_default_na=False)
    raw = raw[raw["medical_specialty"].str.strip().isin(DEPARTMENTS) & (raw["transcription"].str.strip() != "")]
    path = tmp_path_factory.mktemp("hospital") / "notes.csv"
    pd.DataFrame(
        {
            "note_id": [f"N{i:05d}" for i in range(len(raw))],
            "summary": raw["description"].tolist(),
            "note_text": raw["transcription"].tolist(),
            "department": raw["medical_specialty"].str.strip().map(DEPARTMENTS).tolist(),
        }
    ).to_csv(path, index=False)
    return path


def test_medclf_run_evaluate_and_predict_on_a_csv_with_other_columns_and_labels(export, tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"out={out}", f"prepare.input={export}", "prepare.sample_notes=120", f"mlm.model={tiny_bert}", *COLUMNS]
    args += ["mlm.max_length=64", "mlm.batch_size=8", "mlm.micro_batch_size=4", "mlm.max_steps=2", "mlm.eval_blocks=4"]
    args += ["head.max_length=64", "head.windows=1", "head.epochs=2", "compare.seeds=1", "compare.bootstrap=100"]
    pipeline.run(config.load("run", None, args))

    # -- the splits keep the user's names; the default class rule chose among the user's labels
    validation = pd.read_csv(out / "prepare" / "validation.csv", dtype=str, keep_default_na=False)
    assert list(validation.columns) == ["text_id", "source_row", "department", "original_specialty", "note_text"]
    labels = json.loads((out / "prepare" / "labels.json").read_text())
    assert sorted(labels["classes"]) == ["cardiology", "gastroenterology", "neurology", "orthopaedics"]
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["metrics"]) == ["pretrained", "adapted", "baseline"]
    assert capsys.readouterr().out.splitlines()[-1] == str(out / "comparison.md")

    # -- evaluate on the user's own labeled file: other columns, in another order
    held_out = tmp_path / "held_out.csv"
    validation[["note_text", "source_row", "department"]].rename(columns={"source_row": "ward"}).to_csv(
        held_out, index=False
    )
    evaluate.run(config.load("evaluate", None, [f"out={out}", "model=adapted", f"data={held_out}", *COLUMNS]))
    scored = json.loads((out / "evaluate" / "adapted" / "metrics.json").read_text())
    head_scored = json.loads((out / "head-adapted" / "metrics.json").read_text())
    assert scored["rows"] == len(validation) and scored["accuracy"] == head_scored["accuracy"]

    # -- predict new notes (text and an id, no label): the id kept, the text left out, rows in order
    new, predicted = tmp_path / "new.csv", tmp_path / "predicted.csv"
    validation[["note_text"]].assign(note_id=[f"new-{i}" for i in range(len(validation))]).to_csv(new, index=False)
    model = out / "head-adapted" / "model"
    predict.run(config.load("predict", None, [f"model={model}", f"input={new}", f"output={predicted}", *COLUMNS]))
    rows = pd.read_csv(predicted, dtype=str, keep_default_na=False)
    assert list(rows.columns[:2]) == ["row", "note_id"] and "note_text" not in rows.columns
    assert rows["note_id"].tolist() == [f"new-{i}" for i in range(len(validation))]
    hits = (rows["predicted_specialty"] == validation["department"]).mean()
    assert abs(hits - scored["accuracy"]) < 1e-9

    # -- the columns are recorded settings: again is a no-op; another column is refused by key
    made = tree(out)
    pipeline.run(config.load("run", None, args))
    assert tree(out) == made
    record = out / "prepare" / "job.json"
    with pytest.raises(MedclfError, match=rf"{record}: dataset.text_column: note_text there, summary now; overwrite"):
        pipeline.run(config.load("run", None, [*args, "dataset.text_column=summary"]))
    assert tree(out) == made
