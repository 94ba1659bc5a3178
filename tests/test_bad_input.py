"""Bad input in every job: one line naming the file, row or key, exit status 2, and nothing written.

Each case copies a small run folder (prepared splits, a tiny classifier, a raw CSV, notes to
classify), breaks one thing, runs `medclf JOB ...` through medclf.cli.main in this process and
compares the folder's files (names and contents) before and after.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pytest

from medclf import manifest
from medclf.errors import EXIT_BAD_INPUT
from tests.helpers import make_classifier, make_small_run, run_cli, tree

TINY_MLM = ["mlm.max_length=32", "mlm.batch_size=4", "mlm.micro_batch_size=2", "mlm.max_steps=1", "mlm.eval_blocks=2"]
TINY_HEAD = ["head.max_length=32", "head.epochs=1", "head.batch_size=8"]


# ---------------------------------------------------------------- the run folder every case starts from


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared, mtsamples, tiny_bert) -> Path:
    run = make_small_run(tmp_path_factory.mktemp("bad-input") / "run", prepared, train_notes=12, validation_notes=6)
    pd.read_csv(mtsamples, dtype=str, keep_default_na=False).iloc[:300].to_csv(run / "raw.csv", index=False)
    notes = pd.read_csv(run / "prepare" / "validation.csv", dtype=str, keep_default_na=False)
    notes[["text_id", "transcription"]].iloc[:12].to_csv(run / "notes.csv", index=False)
    classes = json.loads((run / "prepare" / "labels.json").read_text())["classes"]
    make_classifier(run / "classifier", tiny_bert, classes)
    (run / "gpt2").mkdir()
    (run / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    (run / "blocked").write_text("a file where a folder would have to be\n")
    return run


def edit_csv(name: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / name
        change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)

    return apply


def set_cell(column: str, row: int, value: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row, column] = value
        return df

    return change


def unknown_label(name: str, row: int) -> Callable[[Path], None]:
    return edit_csv(name, set_cell("medical_specialty", row, "Dermatology"))


def drop_text(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["transcription"])


def not_utf8(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:200] + b"\xff\xfe" + data[200:])

    return apply


def write(name: str, text: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)

    return apply


def edit_text(name: str, change: Callable[[str], str]) -> Callable[[Path], None]:
    """Change a CSV's text as it is on disk (line endings and quoting included)."""

    def apply(run: Path) -> None:
        path = run / name
        path.write_bytes(change(path.read_bytes().decode("utf-8")).encode("utf-8"))

    return apply


def after_header(name: str, record: str) -> Callable[[Path], None]:
    """Insert `record` on line 2, right after the header line."""
    return edit_text(name, lambda text: text.replace("\n", "\n" + record, 1))


def last_header_name(name: Callable[[list[str]], str]) -> Callable[[str], str]:
    """Rename the header's last column to `name(names)`."""

    def change(text: str) -> str:
        header, records = text.split("\n", 1)
        names = header.split(",")
        return ",".join([*names[:-1], name(names)]) + "\n" + records

    return change


REPEATED = last_header_name(lambda names: names[1])  # pandas would rename the second one "<name>.1"
UNNAMED = last_header_name(lambda names: "")  # pandas would call it "Unnamed: 5"


def extra_field_everywhere(text: str) -> str:
    """One more field at the end of every record but the header: pandas would shift them into the index."""
    header, records = text.split("\n", 1)
    return header + "\n" + records.replace("\n", ",extra\n")  # record ends: \n; quoted line breaks: \r\n


def publish(source: str, target: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        manifest.publish_dir(str(run / source), str(run / target))

    return apply


def other_classifier(classes: Optional[list[str]] = None, max_length: int = 32, **windows) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        info = json.loads((run / "classifier" / "classifier.json").read_text())
        shutil.rmtree(run / "classifier")
        make_classifier(run / "classifier", Path(info["encoder"]), classes or info["classes"], max_length, **windows)

    return apply


# (job, what is wrong, arguments, change to the run folder, what the error line must say)
PREPARE = ["prepare", "out={run}/new", "prepare.input={run}/raw.csv"]
MLM = ["mlm", "out={run}", "mlm.model={tiny}", *TINY_MLM]
HEAD = ["head", "out={run}", "mlm.model={tiny}", *TINY_HEAD]
EVALUATE = ["evaluate", "out={run}", "evaluate.model={run}/classifier"]
COMPARE = [
    "compare",
    "out={run}",
    "mlm.model={tiny}",
    "compare.encoders=[pretrained, {tiny}]",
    "compare.seeds=1",
    "compare.bootstrap=10",
    *TINY_HEAD,
]
PREDICT = [
    "predict",
    "predict.model={run}/classifier",
    "predict.input={run}/notes.csv",
    "predict.output={run}/pred.csv",
    "predict.chunk_rows=5",
]
TRAIN, VALIDATION = "prepare/train.csv", "prepare/validation.csv"
NO_SUCH_FILE = r"absent\.csv: no such file"
MISSING_TEXT = r"missing column\(s\) transcription"
UNWRITABLE = r"blocked.*cannot write: .* is a file, not a folder"
NOT_BERT = r"model_type 'gpt2' is not a BERT"
UNKNOWN_LABEL = r"label 'Dermatology' is not one of the classes"

TWICE = r"header names column 'description' twice \(columns 2 and 6\)"
OPEN_QUOTE = '9,d,Surgery,n,"never closed,kw\n'
NEVER_CLOSED = r"line 2: broken quoting .*runs on to line \d+: a quote that never closes"
CR = r"ends with a bare carriage return"

# A column (dataset.text_column, dataset.label_column) the file does not have: the key and the columns present.
NO_NOTE_TEXT = ["dataset.text_column=note_text"]
NO_DEPARTMENT = ["dataset.label_column=department"]
NOTE_TEXT_MISSING = r"missing column\(s\) note_text \(dataset\.text_column\); columns present: .*transcription"
DEPARTMENT_MISSING = r"missing column\(s\) department \(dataset\.label_column\); columns present: .*medical_specialty"
NOTES_HAVE = r"; columns present: text_id, transcription$"  # notes.csv: a user's own file, without labels

CASES = [
    # prepare
    ("prepare", "missing CSV", [*PREPARE, "prepare.input={run}/absent.csv"], None, NO_SUCH_FILE),
    ("prepare", "wrong-schema CSV", PREPARE, edit_csv("raw.csv", drop_text), r"raw\.csv: " + MISSING_TEXT),
    ("prepare", "not UTF-8 text", PREPARE, not_utf8("raw.csv"), r"raw\.csv: not UTF-8"),
    ("prepare", "repeated column name", PREPARE, edit_text("raw.csv", REPEATED), r"raw\.csv: line 1: " + TWICE),
    (
        "prepare",
        "empty column name",
        PREPARE,
        edit_text("raw.csv", UNNAMED),
        r"raw\.csv: line 1: header column 6 has no",
    ),
    ("prepare", "quote never closed", PREPARE, after_header("raw.csv", OPEN_QUOTE), r"raw\.csv: " + NEVER_CLOSED),
    (
        "prepare",
        "quote never closed, at the end",
        PREPARE,
        edit_text("raw.csv", lambda text: text.split("\n", 1)[0] + "\n" + OPEN_QUOTE),
        r"raw\.csv: line 2: broken quoting \(unexpected end of data\)",
    ),
    (
        "prepare",
        "text after a closing quote",
        PREPARE,
        after_header("raw.csv", '9,d,Surgery,n,"closed"then more,kw\n'),
        r"raw\.csv: line 2: broken quoting \(',' expected after",
    ),
    ("prepare", "one field too many", PREPARE, after_header("raw.csv", "9,d,Surgery,n,t,kw,x\n"), r"line 2: 7 fields"),
    (
        "prepare",
        "a field too many on every row",
        PREPARE,
        edit_text("raw.csv", extra_field_everywhere),
        r"line 2: 7 fields",
    ),
    ("prepare", "fields missing", PREPARE, after_header("raw.csv", "9,d,Surgery,n,t\n"), r"raw\.csv: line 2: 5 fields"),
    ("prepare", "NUL byte", PREPARE, after_header("raw.csv", "9,d,Surgery,n,t\0ext,kw\n"), r"line 2: NUL byte"),
    (
        "prepare",
        "bare CR line endings",
        PREPARE,
        edit_text("raw.csv", lambda t: t.replace("\n", "\r")),
        r"line 1: " + CR,
    ),
    (
        "prepare",
        "bare CR inside a row",
        PREPARE,
        after_header("raw.csv", "9,d,Surgery,n,t\rext,kw\n"),
        r"line 2: " + CR,
    ),
    ("prepare", "existing output", [*PREPARE, "out={run}"], None, r"run/prepare: output exists"),
    ("prepare", "unwritable output", [*PREPARE, "out={run}/blocked/run"], None, UNWRITABLE),
    ("prepare", "text column not in the file", [*PREPARE, *NO_NOTE_TEXT], None, r"raw\.csv: " + NOTE_TEXT_MISSING),
    ("prepare", "label column not in the file", [*PREPARE, *NO_DEPARTMENT], None, r"raw\.csv: " + DEPARTMENT_MISSING),
    (
        "run",
        "label column not in the file",
        ["run", "out={run}/new", "prepare.input={run}/raw.csv", "mlm.model={tiny}", *NO_DEPARTMENT],
        None,
        r"raw\.csv: " + DEPARTMENT_MISSING,
    ),
    # mlm
    ("mlm", "text column not in the file", [*MLM, *NO_NOTE_TEXT], None, r"train\.csv: " + NOTE_TEXT_MISSING),
    (
        "mlm",
        "text column not in an extra_text file",
        [*MLM, "mlm.extra_text=[{run}/notes.csv]"],
        edit_csv("notes.csv", drop_text),
        r"notes\.csv: missing column\(s\) transcription \(dataset\.text_column\); columns present: text_id$",
    ),
    ("mlm", "missing CSV", [*MLM, "mlm.train={run}/absent.csv"], None, NO_SUCH_FILE),
    ("mlm", "wrong-schema CSV", MLM, edit_csv(TRAIN, drop_text), r"train\.csv: " + MISSING_TEXT),
    (
        "mlm",
        "empty transcription",
        MLM,
        edit_csv(TRAIN, set_cell("transcription", 3, " ")),
        r"train\.csv: row 4: empty transcription",
    ),
    ("mlm", "not UTF-8 text", MLM, not_utf8(TRAIN), r"train\.csv: not UTF-8"),
    ("mlm", "repeated column name", MLM, edit_text(TRAIN, REPEATED), r"train\.csv: line 1: header names"),
    ("mlm", "quote never closed", MLM, after_header(TRAIN, OPEN_QUOTE), r"train\.csv: " + NEVER_CLOSED),
    ("mlm", "not a BERT-family model", [*MLM, "mlm.model={run}/gpt2"], None, r"gpt2: " + NOT_BERT),
    ("mlm", "not a model folder", [*MLM, "mlm.model={run}/prepare"], None, r"prepare: not a model folder"),
    ("mlm", "max_length above positions", [*MLM, "mlm.max_length=256"], None, r"mlm\.max_length: 256 is above"),
    ("mlm", "existing output", MLM, publish("classifier", "mlm/model"), r"mlm/model: output exists"),
    (
        "mlm",
        "unwritable output",
        [*MLM, "out={run}/blocked/run", "mlm.train={run}/" + TRAIN, "mlm.validation={run}/" + VALIDATION],
        None,
        UNWRITABLE,
    ),
    # head
    ("head", "text column not in the file", [*HEAD, *NO_NOTE_TEXT], None, r"train\.csv: " + NOTE_TEXT_MISSING),
    ("head", "label column not in the file", [*HEAD, *NO_DEPARTMENT], None, r"train\.csv: " + DEPARTMENT_MISSING),
    (
        "head",
        "label column not in a head.train file",
        [*HEAD, "head.train={run}/notes.csv"],
        None,
        r"notes\.csv: missing column\(s\) medical_specialty \(dataset\.label_column\)" + NOTES_HAVE,
    ),
    ("head", "missing CSV", [*HEAD, "head.train={run}/absent.csv"], None, NO_SUCH_FILE),
    (
        "head",
        "missing labels.json",
        HEAD,
        lambda run: (run / "prepare/labels.json").unlink(),
        r"labels\.json: no such file",
    ),
    ("head", "wrong-schema CSV", HEAD, edit_csv(VALIDATION, drop_text), r"validation\.csv: " + MISSING_TEXT),
    (
        "head",
        "empty transcription",
        HEAD,
        edit_csv(TRAIN, set_cell("transcription", 5, "")),
        r"train\.csv: row 6: empty transcription",
    ),
    ("head", "label not in labels.json", HEAD, unknown_label(TRAIN, 2), r"train\.csv: row 3: " + UNKNOWN_LABEL),
    ("head", "not a BERT-family model", [*HEAD, "mlm.model={run}/gpt2"], None, NOT_BERT),
    ("head", "max_length above positions", [*HEAD, "head.max_length=256"], None, r"head\.max_length=256 is above"),
    ("head", "adapted model missing", [*HEAD, "head.encoder=adapted"], None, r"mlm/model has no model yet"),
    (
        "head",
        "dev fraction leaving a class empty",
        [*HEAD, "head.dev_fraction=0.05"],
        None,
        r"head\.dev_fraction=0\.05: the dev part of .*train\.csv has no note of class",
    ),
    ("head", "dev fraction of 1", [*HEAD, "head.dev_fraction=1"], None, r"head\.dev_fraction: must be .* below 1"),
    ("head", "window stride 0", [*HEAD, "head.stride=0"], None, r"head\.stride: must be between 1 and .* got 0$"),
    (
        "head",
        "window stride above max_length - 2",
        [*HEAD, "head.stride=31"],
        None,
        r"head\.stride: must be between 1 and head\.max_length - 2 = 30 .* got 31$",
    ),
    ("head", "warm-up of 1", [*HEAD, "head.warmup_ratio=1"], None, r"head\.warmup_ratio: must be .* below 1, got 1"),
    ("head", "negative warm-up", [*HEAD, "head.warmup_ratio=-0.1"], None, r"head\.warmup_ratio: must be at least 0"),
    ("head", "encoder lr of 0", [*HEAD, "head.encoder_lr=0"], None, r"head\.encoder_lr: must be above 0, got 0"),
    (
        "head",
        "micro-batch of 0",
        [*HEAD, "head.micro_batch_size=0"],
        None,
        r"head\.micro_batch_size: must be at least 1",
    ),
    (
        "head",
        "micro-batch not dividing the batch",
        [*HEAD, "head.micro_batch_size=3"],
        None,
        r"head\.micro_batch_size: must divide head\.batch_size=8, got 3$",
    ),
    ("head", "existing output", HEAD, write("head-pretrained/report.md", "x"), r"head-pretrained: output exists"),
    (
        "head",
        "unwritable output",
        [*HEAD, "head.name=blocked/x"],
        write("head-blocked", "a file"),
        UNWRITABLE.replace("blocked", "head-blocked"),
    ),
    # evaluate
    (
        "evaluate",
        "text column not in the file",
        [*EVALUATE, *NO_NOTE_TEXT],
        None,
        r"validation\.csv: " + NOTE_TEXT_MISSING,
    ),
    (
        "evaluate",
        "label column not in the evaluate.data file",
        [*EVALUATE, "evaluate.data={run}/notes.csv"],
        None,
        r"notes\.csv: missing column\(s\) medical_specialty \(dataset\.label_column\)" + NOTES_HAVE,
    ),
    (
        "evaluate",
        "label column not in the file (baseline)",
        [*EVALUATE, "evaluate.model=baseline", *NO_DEPARTMENT],
        None,
        r"train\.csv: " + DEPARTMENT_MISSING,
    ),
    ("evaluate", "missing CSV", [*EVALUATE, "evaluate.data={run}/absent.csv"], None, NO_SUCH_FILE),
    ("evaluate", "wrong-schema CSV", EVALUATE, edit_csv(VALIDATION, drop_text), r"validation\.csv: " + MISSING_TEXT),
    ("evaluate", "fields missing", EVALUATE, after_header(VALIDATION, "x,y\n"), r"validation\.csv: line 2: 2 fields"),
    (
        "evaluate",
        "empty transcription",
        EVALUATE,
        edit_csv(VALIDATION, set_cell("transcription", 1, "  ")),
        r"validation\.csv: row 2: empty transcription",
    ),
    (
        "evaluate",
        "label not in the classes",
        EVALUATE,
        unknown_label(VALIDATION, 0),
        r"validation\.csv: row 1: " + UNKNOWN_LABEL,
    ),
    (
        "evaluate",
        "classes do not match labels.json",
        EVALUATE,
        other_classifier(["Surgery", "Radiology"]),
        r"classifier classes .* do not match .*labels\.json",
    ),
    (
        "evaluate",
        "not a classifier folder",
        [*EVALUATE, "evaluate.model={tiny}"],
        None,
        r"not a medclf classifier folder",
    ),
    ("evaluate", "max_length above positions", EVALUATE, other_classifier(max_length=256), r"max_length=256 is above"),
    (
        "evaluate",
        "encoder shorter than the classifier's windows",
        EVALUATE,
        other_classifier(max_length=256, stride=200, windows=None),
        r"classifier\.json: windows of max_length=256 is above .* max_position_embeddings 128",
    ),
    (
        "evaluate",
        "existing output",
        EVALUATE,
        write("evaluate/classifier/metrics.json", "{}"),
        r"evaluate/classifier: output exists",
    ),
    (
        "evaluate",
        "unwritable output",
        [*EVALUATE, "out={run}/blocked/run", "evaluate.data={run}/" + VALIDATION],
        None,
        UNWRITABLE,
    ),
    # compare
    ("compare", "text column not in the file", [*COMPARE, *NO_NOTE_TEXT], None, r"train\.csv: " + NOTE_TEXT_MISSING),
    ("compare", "label column not in the file", [*COMPARE, *NO_DEPARTMENT], None, r"train\.csv: " + DEPARTMENT_MISSING),
    ("compare", "missing CSV", [*COMPARE, "head.validation={run}/absent.csv"], None, NO_SUCH_FILE),
    ("compare", "wrong-schema CSV", COMPARE, edit_csv(TRAIN, drop_text), r"train\.csv: " + MISSING_TEXT),
    (
        "compare",
        "empty transcription",
        COMPARE,
        edit_csv(VALIDATION, set_cell("transcription", 2, "")),
        r"validation\.csv: row 3: empty transcription",
    ),
    (
        "compare",
        "label not in labels.json",
        COMPARE,
        unknown_label(VALIDATION, 1),
        r"validation\.csv: row 2: " + UNKNOWN_LABEL,
    ),
    ("compare", "not a BERT-family model", [*COMPARE, "compare.encoders=[pretrained, {run}/gpt2]"], None, NOT_BERT),
    (
        "compare",
        "max_length above positions",
        [*COMPARE, "head.max_length=256"],
        None,
        r"head\.max_length=256 is above",
    ),
    (
        "compare",
        "adapted model missing",
        [*COMPARE, "compare.encoders=[pretrained, adapted]"],
        None,
        r"mlm/model has no model yet",
    ),
    ("compare", "existing output", COMPARE, write("comparison.md", "x"), r"comparison\.md: output exists"),
    # predict
    (
        "predict",
        "text column not in the file",
        [*PREDICT, *NO_NOTE_TEXT],
        None,
        r"notes\.csv: missing column\(s\) note_text \(dataset\.text_column\)" + NOTES_HAVE,
    ),
    ("predict", "missing CSV", [*PREDICT, "predict.input={run}/absent.csv"], None, NO_SUCH_FILE),
    (
        "predict",
        "wrong-schema CSV",
        PREDICT,
        edit_csv("notes.csv", drop_text),
        r"notes\.csv: " + MISSING_TEXT,
    ),
    (
        "predict",
        "empty transcription (second chunk)",
        PREDICT,
        edit_csv("notes.csv", set_cell("transcription", 7, "")),
        r"notes\.csv: row 8: empty transcription",
    ),
    ("predict", "not UTF-8 text", PREDICT, not_utf8("notes.csv"), r"notes\.csv: not UTF-8"),
    ("predict", "not a classifier folder", [*PREDICT, "predict.model={tiny}"], None, r"not a medclf classifier folder"),
    ("predict", "max_length above positions", PREDICT, other_classifier(max_length=256), r"max_length=256 is above"),
    ("predict", "existing output", PREDICT, write("pred.csv", "row\n"), r"pred\.csv: output exists"),
    ("predict", "unwritable output", [*PREDICT, "predict.output={run}/blocked/pred.csv"], None, UNWRITABLE),
]


@pytest.mark.parametrize("job, problem, argv, change, expected", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    job, problem, argv, change, expected, base, tiny_bert, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    if change is not None:
        change(run)
    before = tree(run)
    code, line = run_cli([a.format(run=run, tiny=tiny_bert) for a in argv], capsys)
    assert code == EXIT_BAD_INPUT, line
    assert line.startswith(f"medclf {job}: error: ")
    assert re.search(expected, line), line
    assert tree(run) == before, f"{job} wrote or changed files while failing: {line}"
