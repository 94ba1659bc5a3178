"""The prepare job: raw CSV (MTSamples or your own) -> train.csv, validation.csv, labels.json, stats.json.

medclf prepare jobs/mtsamples.yaml prepare.input=s3://bucket/mtsamples.csv
medclf prepare jobs/mtsamples.yaml prepare.input=notes.csv dataset.text_column=note_text dataset.label_column=department

The splits keep the input's names for the text and label columns (dataset.text_column,
dataset.label_column), so every later job reads them, and the user's own files, the same way.
"""

from __future__ import annotations

import io
import logging

from medclf import data, jobrecord, layout, storage
from medclf.config import RunSpec, required
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

# The splits' columns in memory; in the files the label and text columns take their names from dataset.*.
COLUMNS = ["text_id", "source_row", data.SPECIALTY, "original_specialty", data.TEXT]


def run(spec: RunSpec) -> None:
    cfg, paths = spec.prepare, layout.Run.of(spec)
    out = paths.prepare
    storage.check_writable(out)
    inputs = {"prepare.input": jobrecord.file_fingerprint(required(cfg.input, "prepare.input"))}
    record = jobrecord.Record("prepare", paths.prepare_record, jobrecord.keys("prepare", spec), inputs, [out], [out])
    if jobrecord.up_to_date(record, spec.overwrite):
        return

    # -- read and check: nothing is written until every check has passed
    columns = spec.dataset
    raw = data.read_table(required(cfg.input, "prepare.input"), [columns.label_column, columns.text_column], columns)
    raw = raw.rename(columns={raw.columns[0]: "source_row"}) if raw.columns[0] in ("", "Unnamed: 0") else raw
    if "source_row" not in raw.columns:
        raw.insert(0, "source_row", [str(i) for i in range(len(raw))])
    raw = data.internal(raw, columns, keep=["source_row"])
    notes = data.clean(raw)
    log.info("%s: %d rows, %d without text dropped", cfg.input, len(raw), len(raw) - len(notes))

    # -- classes (the default rule counts all raw rows, as the original did)
    mapping = data.class_map(raw[data.SPECIALTY], cfg.classes, cfg.min_class_share, cfg.short_names)
    df = notes[notes[data.SPECIALTY].isin(mapping)].copy()
    df["original_specialty"] = df[data.SPECIALTY]
    df[data.SPECIALTY] = df[data.SPECIALTY].map(mapping)
    counts = df[data.SPECIALTY].value_counts()
    names = list(dict.fromkeys(mapping.values()))
    empty = [c for c in names if counts.get(c, 0) == 0]
    if empty:
        raise MedclfError(f"{cfg.input}: class(es) {', '.join(empty)} have no rows with text ({columns.text_column})")
    if len(names) < 2:
        raise MedclfError(f"{cfg.input}: only {len(names)} class chosen; a classifier needs at least 2")
    classes = sorted(names, key=lambda c: (-counts[c], c))
    if cfg.sample_notes is not None:
        df = data.sample_notes(df, cfg.sample_notes, spec.seed)

    # -- split
    splitter = data.split_grouped if cfg.split == "grouped" else data.split_random
    train, validation = splitter(df, cfg.validation_fraction, spec.seed)
    for side, part in (("train", train), ("validation", validation)):
        missing = [c for c in classes if not (part[data.SPECIALTY] == c).any()]
        if missing:
            raise MedclfError(f"{cfg.input}: the {side} split has no rows of class(es) {', '.join(missing)}")
    stats = {
        "input": cfg.input,
        "split": cfg.split,
        "seed": spec.seed,
        "raw_rows": len(raw),
        "rows_without_transcription": len(raw) - len(notes),
        "distinct_notes_in_input": int(notes["text_id"].nunique()),
        "notes_in_input_with_several_specialties": int((notes.groupby("text_id")[data.SPECIALTY].nunique() > 1).sum()),
        "rows_kept": len(df),
        "classes": {c: int((df[data.SPECIALTY] == c).sum()) for c in classes},
        **data.split_stats(train, validation, classes),
    }

    # -- write: the record last, so its presence means the folder is complete
    for url, part in ((paths.prepared_train, train), (paths.prepared_validation, validation)):
        buffer = io.BytesIO()
        data.external(part[COLUMNS], columns).to_csv(buffer, index=False, encoding="utf-8")
        storage.write_bytes(url, buffer.getvalue())
    storage.write_json(paths.labels, {"classes": classes, "mapping": mapping})
    storage.write_json(paths.prepared_stats, stats)
    jobrecord.write(record)
    log.info(
        "wrote %s: %d train / %d validation rows, %d classes, %d texts on both sides",
        out,
        len(train),
        len(validation),
        len(classes),
        stats["texts_shared_between_splits"],
    )
