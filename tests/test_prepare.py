"""prepare on the real MTSamples data, over memory://, and on every kind of bad input."""

import hashlib
import json
import lzma
import subprocess
import sys
import uuid

import pandas as pd
import pytest

from medclf import cli, config, prepare, storage
from medclf.errors import EXIT_BAD_INPUT

RAW_SHA256 = "a92cb78569f460606661ee7da50c92305b60d0fac2be4b06c8d2de0f234612d4"  # data/README.md
CLASSES = ["Surgery", "Consult", "Cardiovascular", "Orthopedic", "Radiology", "General Medicine"]


def run_prepare(out, input_url, *overrides):
    prepare.run(config.load("prepare", None, [f"out={out}", f"prepare.input={input_url}", *overrides]))
    folder = storage.join(str(out), "prepare")
    read = lambda name: pd.read_csv(storage.join(folder, name), dtype=str, keep_default_na=False)  # noqa: E731
    return read("train.csv"), read("validation.csv"), storage.read_json(storage.join(folder, "stats.json"))


def test_grouped_split_on_real_data(prepared):
    folder = prepared / "prepare"
    train = pd.read_csv(folder / "train.csv")
    validation = pd.read_csv(folder / "validation.csv")
    stats = json.loads((folder / "stats.json").read_text())
    labels = json.loads((folder / "labels.json").read_text())
    assert labels["classes"] == CLASSES
    assert stats["raw_rows"] == 4999 and stats["rows_without_transcription"] == 33
    assert stats["distinct_notes_in_input"] == 2357
    assert stats["notes_in_input_with_several_specialties"] == 2148
    assert stats["rows_kept"] == len(train) + len(validation) == 2862
    assert set(train.text_id).isdisjoint(validation.text_id)  # no note on both sides
    assert stats["texts_shared_between_splits"] == 0
    assert set(train.transcription).isdisjoint(validation.transcription)
    notes = train.text_id.nunique() + validation.text_id.nunique()
    assert abs(validation.text_id.nunique() - 0.2 * notes) <= 1
    for c in CLASSES:  # stratified: each class close to its overall share on the validation side
        share = (validation.medical_specialty == c).mean()
        overall = stats["classes"][c] / stats["rows_kept"]
        assert abs(share - overall) < 0.03, c
    assert {"text_id", "transcription", "medical_specialty"} <= set(train.columns)
    assert not train.medical_specialty.str.startswith(" ").any()


def test_random_split_reproduces_the_original(tmp_path, mtsamples):
    train, validation, stats = run_prepare(tmp_path, mtsamples, "prepare.split=random")
    assert (len(train), len(validation)) == (2290, 572)
    assert sorted(set(validation.medical_specialty)) == sorted(CLASSES)
    assert stats["classes"]["Surgery"] == 1088
    assert stats["texts_shared_between_splits"] > 0  # the leak the grouped split avoids
    again, _, _ = run_prepare(tmp_path / "again", mtsamples, "prepare.split=random")
    assert list(again.source_row) == list(train.source_row)  # seeded


def test_natural_text_is_kept(tmp_path, mtsamples):
    raw = pd.read_csv(mtsamples)
    train, _, _ = run_prepare(tmp_path, mtsamples, "prepare.sample_notes=300")
    row = train.iloc[0]
    assert raw.loc[int(row.source_row), "transcription"] == row.transcription  # no stop-word removal


def test_explicit_class_mapping(tmp_path, mtsamples):
    train, validation, stats = run_prepare(
        tmp_path, mtsamples, "prepare.classes={Bones: [Orthopedic], Heart: [Cardiovascular / Pulmonary]}"
    )
    assert set(train.medical_specialty) == {"Bones", "Heart"}
    assert stats["classes"] == {"Heart": 371, "Bones": 355}


def test_memory_urls_in_and_out(mtsamples):
    root = f"memory://prep-{uuid.uuid4().hex[:6]}"
    storage.write_bytes(f"{root}/raw/mtsamples.csv", mtsamples.read_bytes())
    train, validation, stats = run_prepare(f"{root}/run", f"{root}/raw/mtsamples.csv", "prepare.sample_notes=200")
    assert len(train) + len(validation) == stats["rows_kept"]
    assert storage.listdir(f"{root}/run/prepare") == [
        "job.json",
        "labels.json",
        "stats.json",
        "train.csv",
        "validation.csv",
    ]


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.fixture
def tiny_raw(mtsamples):
    return pd.read_csv(mtsamples).head(400)


def write_csv(path, frame):
    frame.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing file", "nope.csv: no such file"),
        ("empty file", "raw.csv: file is empty"),
        ("missing column", "raw.csv: missing column(s) transcription"),
        ("not utf-8", "raw.csv: not UTF-8 (bad byte 0xe9 on line 2)"),
        ("class left empty", "class(es) Nothing have no rows"),
        ("output exists", "output exists without job.json (an interrupted or older run); overwrite=true starts"),
        ("unknown key", "prepare.splt: unknown key"),
    ],
)
def test_bad_input(case, expected, tmp_path, tiny_raw, capsys):
    raw = tmp_path / "raw.csv"
    out = tmp_path / "run"
    args = [f"out={out}", f"prepare.input={raw}"]
    if case == "missing file":
        args[1] = f"prepare.input={tmp_path / 'nope.csv'}"
    elif case == "empty file":
        raw.write_text("")
    elif case == "missing column":
        write_csv(raw, tiny_raw.drop(columns=["transcription"]))
    elif case == "not utf-8":
        raw.write_bytes(b"medical_specialty,transcription\n Surgery,caf\xe9\n")
    elif case == "class left empty":
        write_csv(raw, tiny_raw)
        args.append("prepare.classes={Surgery: [Surgery], Nothing: [No Such Specialty]}")
    elif case == "output exists":
        write_csv(raw, tiny_raw)
        (out / "prepare").mkdir(parents=True)
        (out / "prepare" / "train.csv").write_text("keep me")
    elif case == "unknown key":
        write_csv(raw, tiny_raw)
        args.append("prepare.splt=random")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = run_cli(capsys, "prepare", *args)
    assert code == EXIT_BAD_INPUT
    assert expected in err and len(err.splitlines()) == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_excel_bom_and_unnamed_index_column_are_accepted(tmp_path, tiny_raw):
    """Excel's "CSV UTF-8" starts with a byte order mark, and pandas' to_csv writes an unnamed index column."""
    frame = tiny_raw.set_index("Unnamed: 0").rename_axis(None)  # header ",description,...", as in MTSamples
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    frame.to_csv(plain)
    frame.to_csv(bom, encoding="utf-8-sig")
    assert bom.read_bytes() == b"\xef\xbb\xbf" + plain.read_bytes()
    train, validation, _ = run_prepare(tmp_path / "plain", plain)
    train_bom, validation_bom, _ = run_prepare(tmp_path / "bom", bom)
    pd.testing.assert_frame_equal(train_bom, train)
    pd.testing.assert_frame_equal(validation_bom, validation)
    assert all("\ufeff" not in c for c in train_bom.columns)


def test_overwrite_replaces(tmp_path, tiny_raw):
    raw = write_csv(tmp_path / "raw.csv", tiny_raw)
    (tmp_path / "run" / "prepare").mkdir(parents=True)
    (tmp_path / "run" / "prepare" / "stale.txt").write_text("old")
    prepare.run(config.load("prepare", None, [f"out={tmp_path / 'run'}", f"input={raw}", "overwrite=true"]))
    assert sorted(p.name for p in (tmp_path / "run" / "prepare").iterdir()) == [
        "job.json",
        "labels.json",
        "stats.json",
        "train.csv",
        "validation.csv",
    ]


def test_cli_entry_points(tmp_path, tiny_raw):
    """The console script and `python -m medclf` both run a job from a spec file."""
    raw = write_csv(tmp_path / "raw.csv", tiny_raw)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"out: {tmp_path / 'run'}\nprepare:\n  input: {raw}\n")
    done = subprocess.run([sys.executable, "-m", "medclf", "prepare", str(spec)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "prepare" / "stats.json").exists()
    help_text = subprocess.run(["medclf", "prepare", "--help"], capture_output=True, text=True).stdout
    assert "prepare.split = grouped" in help_text and "prepare.input" in help_text
    bad = subprocess.run(["medclf", "nojob"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown job 'nojob'" in bad.stderr


def test_the_shipped_xz_is_the_raw_file_and_prepare_reads_it_directly(mtsamples, tmp_path):
    from tests.conftest import SHIPPED_DATA

    assert hashlib.sha256(lzma.decompress(SHIPPED_DATA.read_bytes())).hexdigest() == RAW_SHA256
    from_xz = run_prepare(tmp_path / "xz", str(SHIPPED_DATA), "prepare.sample_notes=200")
    from_csv = run_prepare(tmp_path / "csv", str(mtsamples), "prepare.sample_notes=200")
    assert from_xz[0].equals(from_csv[0]) and from_xz[1].equals(from_csv[1])
    assert {k: v for k, v in from_xz[2].items() if k != "input"} == {
        k: v for k, v in from_csv[2].items() if k != "input"
    }


def test_a_truncated_xz_is_one_line_and_writes_nothing(capsys, tmp_path):
    from tests.conftest import SHIPPED_DATA

    (tmp_path / "cut.csv.xz").write_bytes(SHIPPED_DATA.read_bytes()[:5000])
    code, err = run_cli(capsys, "prepare", f"out={tmp_path / 'run'}", f"prepare.input={tmp_path / 'cut.csv.xz'}")
    assert code == 2 and "cut.csv.xz: cannot decompress" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
