"""Labeled note tables (MTSamples or your own): schema checks, cleaning, class mapping, splits and the label file.

Every job reads its CSVs through `read_table`, so bad input is reported the same way everywhere:
one line naming the file (and row or column) and what is wrong.

A file's text and label columns are whatever `dataset.text_column` and `dataset.label_column` name; once
read, a table holds them under the fixed names TEXT and SPECIALTY, so the jobs never see a user's
names. Those are MTSamples' own: a default run's tables in memory have its files' columns.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import lzma
from typing import Iterable, Iterator, Optional

import numpy as np
import pandas as pd

from medclf import layout, storage
from medclf.config import DatasetSpec
from medclf.errors import MedclfError

# A table's text and label columns in memory, whatever its file calls them.
TEXT = "transcription"
SPECIALTY = "medical_specialty"


# ---------------------------------------------------------------- reading


def read_table(url: str, columns: list[str], named_by: Optional[DatasetSpec] = None) -> pd.DataFrame:
    """Read a UTF-8 CSV (plain or compressed: `.csv.xz`, `.csv.gz`) and check it has `columns`; all values as text.

    The structure is checked first (see `check_structure`): pandas repairs many broken CSVs
    without a word, so only a file that is a well-formed table reaches it. A missing column is
    named with the key of `named_by` that names it (see `check_columns`).
    """
    data = storage.read_bytes(url, decompress=True)
    if not data.strip():
        raise MedclfError(f"{url}: file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MedclfError(f"{url}: not UTF-8 (bad byte 0x{data[e.start]:02x} on line {line})") from None
    # A UTF-8 byte order mark is what Excel writes with "CSV UTF-8": accepted, and dropped so that
    # it never becomes part of the first column's name.
    text = text.removeprefix("\ufeff")
    records = check_structure(text, url)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise MedclfError(f"{url}: not a readable CSV ({' '.join(str(e).split())})") from None
    if len(df) != records:
        raise MedclfError(f"{url}: pandas read {len(df)} rows where the file has {records} records")
    check_columns(url, list(map(str, df.columns)), columns, named_by)
    return df


def check_columns(url: str, present: list[str], columns: list[str], named_by: Optional[DatasetSpec] = None) -> None:
    """One line naming each missing column, with the spec key that names it, and the columns present."""
    keys: dict[str, str] = {}
    if named_by is not None:
        keys = {named_by.label_column: "dataset.label_column", named_by.text_column: "dataset.text_column"}
    missing = [f"{c} ({keys[c]})" if c in keys else c for c in columns if c not in present]
    if missing:
        raise MedclfError(f"{url}: missing column(s) {', '.join(missing)}; columns present: {', '.join(present)}")


def read_text_chunks(url: str, column: str, chunk_rows: int) -> Iterator[list[str]]:
    """The values of `column` (the text column, dataset.text_column), `chunk_rows` rows at a time, of a
    CSV of any size (plain or compressed), checked as `record_chunks` says."""
    with storage.open_read(url, "rb", compression="infer") as source:
        for names, records in record_chunks(source, url, [column], DatasetSpec(text_column=column), chunk_rows):
            at = names.index(column)
            yield [record[at] for record in records]


def record_chunks(
    source, url: str, columns: list[str], named_by: Optional[DatasetSpec], chunk_rows: int
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """(column names, up to `chunk_rows` records) at a time, of the binary CSV stream `source`.

    Checked as every job's input is (`checked_records`: broken quoting, a repeated column name, a
    record of the wrong width, NUL bytes, bare carriage returns) record by record, so memory stays
    one chunk however long the file is; `columns` missing are named as `check_columns` says. An
    unnamed first column is "Unnamed: 0", as pandas names it."""
    lines = io.TextIOWrapper(source, encoding="utf-8-sig", newline="")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long note is not a broken file
    try:
        records = checked_records(lines, url)
        header = next(records, None)
        if header is None:
            raise MedclfError(f"{url}: file is empty")
        names = ["Unnamed: 0" if i == 0 and name == "" else name for i, name in enumerate(header)]
        check_columns(url, names, columns, named_by)
        for chunk in iter(lambda: list(itertools.islice(records, chunk_rows)), []):
            yield names, chunk
    except UnicodeDecodeError as e:
        raise MedclfError(f"{url}: not UTF-8 (bad byte 0x{e.object[e.start]:02x})") from None
    except (lzma.LZMAError, EOFError) as e:
        raise MedclfError(f"{url}: cannot decompress ({storage.describe_error(e)})") from None


def check_structure(text: str, url: str) -> int:
    """Refuse what pandas would silently repair; returns the number of data records.

    Refused: a NUL byte, a line ending in a bare carriage return, broken quoting (a quote that
    never closes, or text after a closing quote), a record with more or fewer fields than the
    header, and a header with a repeated or empty column name. An empty first column name is the
    unnamed index column that pandas' `to_csv` writes (the MTSamples file has one): accepted.
    Blank lines are skipped, as pandas does: they hold no values. Errors name the line on which
    the offending record starts.
    """
    nul = text.find("\0")
    if nul >= 0:
        raise MedclfError(f"{url}: line {text.count(chr(10), 0, nul) + 1}: NUL byte (not a text CSV)")
    # The csv module refuses fields over 128 KiB; pandas has no such limit, and a long note is not broken.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    return sum(1 for _ in checked_records(io.StringIO(text, newline=""), url)) - 1


def checked_records(lines: Iterable[str], url: str) -> Iterator[list[str]]:
    """The header, then every data record, of a CSV read line by line (open it with newline=""),
    each checked as `check_structure` says as it comes: a streaming reader holds one record at a time."""
    last_line = [""]

    def tracked() -> Iterator[str]:
        for number, line in enumerate(lines, 1):
            if "\0" in line:
                raise MedclfError(f"{url}: line {number}: NUL byte (not a text CSV)")
            last_line[0] = line
            yield line

    reader = csv.reader(tracked(), strict=True)
    header: Optional[list[str]] = None
    start = 1
    try:
        for record in reader:
            if last_line[0].endswith("\r"):
                raise MedclfError(
                    f"{url}: line {reader.line_num}: ends with a bare carriage return (\\r); "
                    "only \\n or \\r\\n line endings are read"
                )
            if record and header is None:
                header = record
                _check_header(header, url, start)
                yield record
            elif record and header is not None and len(record) != len(header):
                problem = f"{len(record)} fields, the header has {len(header)}"
                raise MedclfError(f"{url}: line {start}: {problem}{_runs_on(start, reader.line_num)}")
            elif record:
                yield record
            start = reader.line_num + 1
    except csv.Error as e:
        raise MedclfError(f"{url}: line {start}: broken quoting ({e}){_runs_on(start, reader.line_num)}") from None


def _runs_on(start: int, end: int) -> str:
    """A record that ends on a later line than it starts: quoted line breaks, or a quote never closed."""
    return f" (the record runs on to line {end}: a quote that never closes?)" if end > start else ""


def _check_header(header: list[str], url: str, line: int) -> None:
    seen: dict[str, int] = {}
    for number, name in enumerate(header, 1):
        if name == "" and number > 1:
            raise MedclfError(f"{url}: line {line}: header column {number} has no name")
        if name in seen:
            raise MedclfError(
                f"{url}: line {line}: header names column {name!r} twice (columns {seen[name]} and {number})"
            )
        seen[name] = number


def check_texts(df: pd.DataFrame, url: str, column: str) -> None:
    """Every row must carry some text: name the first row that does not."""
    empty = df[column].str.strip() == ""
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0]) + 1
        raise MedclfError(f"{url}: row {row}: empty {column} ({int(empty.sum())} such rows)")


def text_id(text: str) -> str:
    """A stable id of a distinct note: copies of the same text listed under several specialties share it."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- labels


def read_labels(url: str) -> list[str]:
    labels = storage.read_json(url)
    if not isinstance(labels, dict) or not isinstance(labels.get("classes"), list):
        raise MedclfError(f'{url}: expected {{"classes": [...]}}')
    return [str(c) for c in labels["classes"]]


def label_indices(df: pd.DataFrame, classes: list[str], url: str, column: str) -> np.ndarray:
    """Class index of every row (its label in `column`); a label outside `classes` names its row."""
    index = {c: i for i, c in enumerate(classes)}
    labels = df[column].str.strip()
    unknown = ~labels.isin(index)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise MedclfError(
            f"{url}: row {row + 1}: label {labels.iloc[row]!r} is not one of the classes ({', '.join(classes)})"
        )
    return labels.map(index).to_numpy(dtype=np.int64)


def read_labeled(url: str, classes: list[str], columns: DatasetSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """A labeled CSV (a prepared split or the user's own, its columns named by `columns`): texts
    checked, labels as indices into `classes`. The frame holds TEXT and SPECIALTY, after `text_id`
    when the file has one (the prepared splits do)."""
    df = read_table(url, [columns.text_column, columns.label_column], columns)
    check_texts(df, url, columns.text_column)
    y = label_indices(df, classes, url, columns.label_column)
    return internal(df, columns, keep=["text_id"] if "text_id" in df.columns else []), y


def internal(df: pd.DataFrame, columns: DatasetSpec, keep: list[str]) -> pd.DataFrame:
    """The `keep` columns, then the text and label columns under their names in memory (TEXT, SPECIALTY);
    the file's other columns are left out, so none of them can clash with those names."""
    picked = df[[*keep, columns.label_column, columns.text_column]]
    return picked.set_axis([*keep, SPECIALTY, TEXT], axis=1)


def external(df: pd.DataFrame, columns: DatasetSpec) -> pd.DataFrame:
    """A frame in memory with its text and label columns under the names `columns` gives them in files."""
    return df.rename(columns={TEXT: columns.text_column, SPECIALTY: columns.label_column})


def read_splits(out: str, columns: DatasetSpec, train: Optional[str] = None, validation: Optional[str] = None):
    """A run's classes and its labeled splits, each as (url, frame, label indices).

    `train`/`validation` default to the prepare job's files under `<out>/prepare/`.
    """
    paths = layout.Run(out)
    classes = read_labels(paths.labels)
    splits = []
    for url in (train or paths.prepared_train, validation or paths.prepared_validation):
        splits.append((url, *read_labeled(url, classes, columns)))
    return classes, splits[0], splits[1]


# ---------------------------------------------------------------- prepare's steps


def clean(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows without text, strip the labels, add `text_id`; the words stay as they are."""
    df = df[df[TEXT].str.strip() != ""].copy()
    df[SPECIALTY] = df[SPECIALTY].str.strip()
    df.insert(0, "text_id", df[TEXT].map(text_id))
    return df


def class_map(
    specialties: pd.Series,
    classes: Optional[dict[str, list[str]]],
    min_share: float,
    short_names: dict[str, str],
) -> dict[str, str]:
    """specialty -> class name. Default: the original rule, specialties above `min_share` of all rows."""
    if classes is not None:
        mapping: dict[str, str] = {}
        for name, sources in classes.items():
            for source in sources:
                if source in mapping:
                    raise MedclfError(
                        f"prepare.classes: specialty {source!r} is in both {mapping[source]!r} and {name!r}"
                    )
                mapping[source] = name
        return mapping
    shares = specialties.str.strip().value_counts(normalize=True)
    return {s: short_names.get(s, s) for s in shares.index[shares > min_share]}


def sample_notes(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """All rows of a seeded sample of `n` distinct notes (every class keeps its copies together)."""
    ids = df["text_id"].drop_duplicates()
    keep = ids.sample(n=min(n, len(ids)), random_state=seed)
    return df[df["text_id"].isin(set(keep))]


def split_random(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The original row-wise split (`df.sample(frac=0.8)`), seeded; copies of a note may land on both sides."""
    train = df.sample(frac=1 - fraction, random_state=seed)
    return train, df.drop(train.index)


def split_grouped(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split distinct notes, not rows: all copies of a text stay on one side.

    Notes are stratified by their set of classes (a knee arthroscopy listed as Orthopedic and
    Surgery is its own stratum), shuffled with `seed`, and each stratum gives its share of
    notes to validation, rounded so that the total is `fraction` of all notes.
    """
    notes = df.groupby("text_id", sort=True)[SPECIALTY].agg(lambda s: "|".join(sorted(set(s))))
    rng = np.random.default_rng(seed)
    target = fraction * len(notes)
    chosen: list[str] = []
    carried = 0.0
    for _, group in sorted(notes.groupby(notes).groups.items()):
        ids = list(group)
        rng.shuffle(ids)
        want = fraction * len(ids) + carried
        take = int(round(want))
        carried = want - take
        chosen += ids[:take]
    assert abs(len(chosen) - target) <= 1
    in_validation = df["text_id"].isin(set(chosen))
    return df[~in_validation], df[in_validation]


def split_stats(train: pd.DataFrame, validation: pd.DataFrame, classes: list[str]) -> dict:
    """What a reader needs to trust a split: class counts per side and how much text crosses over."""
    both = pd.concat([train, validation])
    shared = set(train["text_id"]) & set(validation["text_id"])
    return {
        "rows": {"train": len(train), "validation": len(validation)},
        "notes": {"train": int(train["text_id"].nunique()), "validation": int(validation["text_id"].nunique())},
        "class_counts": {
            side: {c: int((part[SPECIALTY] == c).sum()) for c in classes}
            for side, part in (("train", train), ("validation", validation))
        },
        "notes_with_several_labels": int((both.groupby("text_id")[SPECIALTY].nunique() > 1).sum()),
        "texts_shared_between_splits": len(shared),
        "validation_rows_with_text_in_train": int(validation["text_id"].isin(shared).sum()),
    }
