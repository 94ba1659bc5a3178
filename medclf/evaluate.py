"""The evaluate job, and the metrics and report every job that scores a classifier writes.

    medclf evaluate jobs/mtsamples.yaml --model adapted
    medclf evaluate jobs/mtsamples.yaml --model s3://bucket/run/head-adapted/model --data URL

Writes metrics.json, report.md and confusion.png: accuracy and weighted precision/recall/F1
(the original's metrics), macro F1, a per-class report, the confusion matrix, and any-label
accuracy, which counts a prediction as right when it is any of the note's specialties (the same
note is filed under several; DESIGN.md, "Data facts"). A head's own report lies in
<out>/head-<name>/; this job writes <out>/evaluate/<name>/.
"""

from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from medclf import classifier, data, features, runtime, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

HEADLINE = ["accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro", "any_label_accuracy"]


def run(spec: RunSpec) -> None:
    cfg = spec.evaluate
    by_name = "/" not in cfg.model and "://" not in cfg.model
    model_url = storage.join(spec.out, f"head-{cfg.model}", "model") if by_name else cfg.model
    name = cfg.model if by_name else cfg.model.rstrip("/").removesuffix("/model").rsplit("/", 1)[-1]
    out = storage.join(spec.out, "evaluate", name)
    storage.check_output(out, spec.overwrite)

    # -- the classifier and the data, checked against each other before any encoding
    info = classifier.read_info(model_url)
    data_url = cfg.data or storage.join(spec.out, "prepare", "validation.csv")
    labels_url = storage.join(spec.out, "prepare", "labels.json")
    if cfg.data is None and storage.exists(labels_url) and data.read_labels(labels_url) != info.classes:
        raise MedclfError(
            f"{model_url}: classifier classes ({', '.join(info.classes)}) do not match {labels_url} "
            f"({', '.join(data.read_labels(labels_url))})"
        )
    df, y = data.read_labeled(data_url, info.classes)
    accelerator = runtime.make_accelerator()
    model, tokenizer, info = classifier.load(model_url)

    # -- predictions: a frozen encoder's features come from (and go to) the run's feature cache
    texts = df[data.TEXT].tolist()
    if info.frozen:
        vectors = features.cached_encode(
            model,
            tokenizer,
            texts,
            max_length=info.max_length,
            batch_size=cfg.batch_size,
            accelerator=accelerator,
            cache_dir=storage.join(spec.out, "features"),
            encoder_fingerprint=info.encoder_fingerprint,
            source=data_url,
        )
    else:
        vectors = features.encode(model, tokenizer, texts, info.max_length, cfg.batch_size, accelerator)
    with torch.no_grad():
        predicted = model.head(vectors.to(accelerator.device)).argmax(-1).cpu().numpy()

    if accelerator.is_main_process:
        write_report(
            out,
            f"{model_url} on {data_url}",
            info.classes,
            y,
            predicted,
            note_labels(spec.out, df),
            about={"model": model_url, "data": data_url},
        )
    accelerator.wait_for_everyone()


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


def note_labels(out: str, df: pd.DataFrame) -> list[set[str]]:
    """Every row's correct classes: the labels of all copies of its text in the prepared train and
    validation files and in `df` itself."""
    ids = df["text_id"] if "text_id" in df.columns else df[data.TEXT].map(data.text_id)
    by_note: dict[str, set[str]] = {}
    parts = [pd.DataFrame({"text_id": ids, data.SPECIALTY: df[data.SPECIALTY].str.strip()})]
    for name in ("train.csv", "validation.csv"):
        url = storage.join(out, "prepare", name)
        if storage.exists(url):
            parts.append(data.read_table(url, ["text_id", data.SPECIALTY])[["text_id", data.SPECIALTY]])
    for part in parts:
        for note, label in zip(part["text_id"], part[data.SPECIALTY], strict=True):
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
    """metrics.json, report.md and confusion.png under `out`; returns the metrics."""
    result = metrics(classes, y_true, y_pred, label_sets)
    storage.write_json(storage.join(out, "metrics.json"), {**about, **result})
    storage.write_bytes(storage.join(out, "confusion.png"), confusion_png(classes, result["confusion_matrix"]))
    storage.write_text(storage.join(out, "report.md"), report_markdown(title, classes, result))
    log.info("%s: %s", title, " ".join(f"{k} {result[k]:.4f}" for k in HEADLINE if result[k] is not None))
    return result


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
