"""The evaluate job: score a saved classifier on a labeled CSV.

    medclf evaluate jobs/mtsamples.yaml --model adapted
    medclf evaluate jobs/mtsamples.yaml --model s3://bucket/run/head-adapted/model --data URL

Writes <out>/evaluate/<name>/{metrics.json, report.md, confusion.png} (medclf/report.py: the
original's metrics plus macro F1, per-class figures, the confusion matrix and any-label accuracy,
which counts a prediction as right when it is any of the note's specialties). A head's own
report lies in <out>/head-<name>/.

    medclf evaluate jobs/mtsamples.yaml --model baseline

scores the TF-IDF baseline (medclf/baseline.py), fitted on the prepared training split (or
head.train), on the same data: the floor a classifier should beat on this data.
"""

from __future__ import annotations

import logging

import torch

from medclf import baseline, classifier, data, features, jobrecord, layout, report, runtime, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    if spec.evaluate.model == baseline.NAME:
        return run_baseline(spec)
    cfg = spec.evaluate
    paths = layout.Run.of(spec)
    by_name = "/" not in cfg.model and "://" not in cfg.model
    model_url = paths.head_model(cfg.model) if by_name else cfg.model
    name = cfg.model if by_name else cfg.model.rstrip("/").removesuffix("/model").rsplit("/", 1)[-1]
    out = paths.evaluation(name)
    storage.check_writable(out)
    accelerator = runtime.make_accelerator(paths.out)  # before anything is read under out: all ranks see it

    # -- the classifier and the data, checked against each other before any encoding
    info = classifier.read_info(model_url)
    data_url = cfg.data or paths.prepared_validation
    labels_url = paths.labels
    if cfg.data is None and storage.exists(labels_url) and data.read_labels(labels_url) != info.classes:
        raise MedclfError(
            f"{model_url}: classifier classes ({', '.join(info.classes)}) do not match {labels_url} "
            f"({', '.join(data.read_labels(labels_url))})"
        )
    df, y = data.read_labeled(data_url, info.classes, spec.dataset)
    inputs = {"evaluate.model": jobrecord.folder_fingerprint(model_url, "classifier")}
    inputs |= jobrecord.split_inputs(paths.out, [data_url])
    record = jobrecord.Record(
        "evaluate", paths.evaluation_record(name), jobrecord.keys("evaluate", spec), inputs, [out], [out]
    )
    if jobrecord.up_to_date(record, spec.overwrite, accelerator):
        return
    model, tokenizer, info = classifier.load(model_url, info)  # its folder verified once, above

    # -- predictions: a frozen encoder's features come from (and go to) the run's feature cache
    texts = df[data.TEXT].tolist()
    if info.frozen:
        vectors = features.cached_encode(
            model,
            tokenizer,
            texts,
            windows=info.windowing,
            batch_size=cfg.batch_size,
            accelerator=accelerator,
            cache_dir=paths.features,
            encoder_fingerprint=info.encoder_fingerprint,
            source=data_url,
        )
    else:
        vectors = features.encode(model, tokenizer, texts, info.windowing, cfg.batch_size, accelerator)
    with torch.no_grad():
        predicted = model.head(vectors.to(accelerator.device)).argmax(-1).cpu().numpy()

    if accelerator.is_main_process:
        report.write_report(
            out,
            f"{model_url} on {data_url}",
            info.classes,
            y,
            predicted,
            report.note_labels(paths.out, df, spec.dataset),
            about={"model": model_url, "data": data_url},
        )
        jobrecord.write(record)
    accelerator.wait_for_everyone()


def run_baseline(spec: RunSpec) -> None:
    """The TF-IDF baseline fitted on the training split, scored on evaluate.data (default: validation)."""
    paths = layout.Run.of(spec)
    out = paths.evaluation(baseline.NAME)
    storage.check_writable(out)
    data_url = spec.evaluate.data or paths.prepared_validation
    classes = data.read_labels(paths.labels)
    train_url = spec.head.train or paths.prepared_train
    inputs = jobrecord.split_inputs(paths.out, [train_url, data_url])
    record = jobrecord.Record(
        "evaluate", paths.evaluation_record(baseline.NAME), jobrecord.keys("evaluate", spec), inputs, [out], [out]
    )
    if jobrecord.up_to_date(record, spec.overwrite):
        return
    train_df, train_y = data.read_labeled(train_url, classes, spec.dataset)
    df, y = data.read_labeled(data_url, classes, spec.dataset)
    predicted = baseline.fit_predict(train_df[data.TEXT].tolist(), train_y, df[data.TEXT].tolist())
    report.write_report(
        out,
        f"baseline ({baseline.DESCRIPTION}) on {data_url}",
        classes,
        y,
        predicted,
        report.note_labels(paths.out, df, spec.dataset),
        about={"model": baseline.DESCRIPTION, "train": train_url, "data": data_url},
    )
    jobrecord.write(record)
