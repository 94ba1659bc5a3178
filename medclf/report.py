"""The metrics and the report every job that scores a classifier writes (head, evaluate, compare).

Accuracy and weighted precision/recall/F1 (the original's metrics), macro F1, a per-class report,
the confusion matrix, and any-label accuracy, which counts a prediction as right when it is any
of the note's specialties (MTSamples files the same note under several).

The three files get a manifest (medclf/manifest.py) written after them: a report without one was
interrupted, and `read_metrics`/`is_complete` refuse it, as they refuse a file changed since.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from medclf import data, layout, manifest, storage
from medclf.config import DatasetSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

METRICS = "metrics.json"
HEADLINE = ["accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro", "any_label_accuracy"]


# ---------------------------------------------------------------- metrics


def metrics(
    classes: list[str], y_true: np.ndarray, y_pred: np.ndarray, label_sets: Optional[list[set[str]]] = None
) -> dict:
    """The headline numbers, the per-class report and the confusion matrix (rows: true, columns: predicted)."""
    labels = list(range(len(classes)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    per_p, per_r, per_f, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    result = {
        "rows": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_weighted": float(p),
        "recall_weighted": float(r),
        "f1_weighted": float(f),
        "f1_macro": float(
            precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)[2]
        ),
        "any_label_accuracy": None,
        "per_class": {
            c: {
                "precision": float(per_p[i]),
                "recall": float(per_r[i]),
                "f1": float(per_f[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if label_sets is not None:
        hits = [classes[p] in s for p, s in zip(y_pred, label_sets, strict=True)]
        result["any_label_accuracy"] = float(np.mean(hits))
    return result


def note_labels(out: str, df: pd.DataFrame, columns: DatasetSpec) -> list[set[str]]:
    """Every row's correct classes: the labels of all copies of its text in the prepared train and
    validation files (their label column named by `columns`) and in `df` itself (a table in memory)."""
    ids = df["text_id"] if "text_id" in df.columns else df[data.TEXT].map(data.text_id)
    by_note: dict[str, set[str]] = {}
    parts = [pd.DataFrame({"text_id": ids, "label": df[data.SPECIALTY].str.strip()})]
    for url in (layout.Run(out).prepared_train, layout.Run(out).prepared_validation):
        if storage.exists(url):
            prepared = data.read_table(url, ["text_id", columns.label_column], columns)
            parts.append(prepared[["text_id", columns.label_column]].set_axis(["text_id", "label"], axis=1))
    for part in parts:
        for note, label in zip(part["text_id"], part["label"], strict=True):
            by_note.setdefault(note, set()).add(label)
    return [by_note[note] for note in ids]


# ---------------------------------------------------------------- the report


def write_report(
    out: str,
    title: str,
    classes: list[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    label_sets: Optional[list[set[str]]],
    about: dict,
) -> dict:
    """metrics.json, report.md and confusion.png under `out`, then their manifest (the completeness
    marker: `read_metrics` and `is_complete` trust the report only once it is there); returns the metrics."""
    result = metrics(classes, y_true, y_pred, label_sets)
    files = {
        METRICS: (json.dumps({**about, **result}, indent=2) + "\n").encode("utf-8"),
        "confusion.png": confusion_png(classes, result["confusion_matrix"]),
        "report.md": report_markdown(title, classes, result).encode("utf-8"),
    }
    storage.remove(storage.join(out, manifest.MANIFEST))  # first: a report being replaced is never "complete"
    for name, content in files.items():
        storage.write_bytes(storage.join(out, name), content)
    manifest.write(out, {name: manifest.entry(content) for name, content in files.items()}, kind="report")
    log.info("%s: %s", title, " ".join(f"{k} {result[k]:.4f}" for k in HEADLINE if result[k] is not None))
    return result


def is_complete(out: str) -> bool:
    """Whether `out` holds a complete, intact report (its three files match their manifest)."""
    try:
        read_metrics(out)
        return True
    except MedclfError:
        return False


def read_metrics(out: str) -> dict:
    """metrics.json of the report under `out`, refused (one line) unless every report file matches the manifest."""
    listing = manifest.verify(out, "report")
    if METRICS not in listing["files"]:
        raise MedclfError(f"{storage.join(out, manifest.MANIFEST)}: not a report manifest (no {METRICS})")
    return json.loads(manifest.read_verified(out, METRICS, listing))


def report_markdown(title: str, classes: list[str], result: dict) -> str:
    lines = [f"# {title}", "", f"{result['rows']} rows.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {result[k]:.4f} |" for k in HEADLINE if result[k] is not None]
    lines += ["", "any_label_accuracy counts a prediction as correct when it is any of the note's specialties.", ""]
    lines += ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for c in classes:
        row = result["per_class"][c]
        lines.append(f"| {c} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    lines += ["", "Confusion matrix (rows: true class, columns: predicted), also in confusion.png:", ""]
    lines += ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [
        f"| {c} | " + " | ".join(str(v) for v in row) + " |"
        for c, row in zip(classes, result["confusion_matrix"], strict=True)
    ]
    return "\n".join(lines) + "\n"


def confusion_png(classes: list[str], matrix: list[list[int]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > counts.max() / 2 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
