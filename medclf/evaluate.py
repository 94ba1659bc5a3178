"""The evaluate job: score a saved classifier on a labeled CSV.

    medclf evaluate jobs/mtsamples.yaml --model adapted
    medclf evaluate jobs/mtsamples.yaml --model s3://bucket/run/head-adapted/model --data URL

Writes <out>/evaluate/<name>/{metrics.json, report.md, confusion.png} (medclf/report.py: the
original's metrics plus macro F1, per-class figures, the confusion matrix and any-label accuracy,
which counts a prediction as right when it is any of the note's specialties). A head's own
report lies in <out>/head-<name>/.
"""

from __future__ import annotations

import logging

import torch

from medclf import classifier, data, features, layout, report, runtime, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    cfg = spec.evaluate
    paths = layout.Run(spec.out)
    by_name = "/" not in cfg.model and "://" not in cfg.model
    model_url = paths.head_model(cfg.model) if by_name else cfg.model
    name = cfg.model if by_name else cfg.model.rstrip("/").removesuffix("/model").rsplit("/", 1)[-1]
    out = paths.evaluation(name)
    storage.check_output(out, spec.overwrite)

    # -- the classifier and the data, checked against each other before any encoding
    info = classifier.read_info(model_url)
    data_url = cfg.data or paths.prepared_validation
    labels_url = paths.labels
    if cfg.data is None and storage.exists(labels_url) and data.read_labels(labels_url) != info.classes:
        raise MedclfError(
            f"{model_url}: classifier classes ({', '.join(info.classes)}) do not match {labels_url} "
            f"({', '.join(data.read_labels(labels_url))})"
        )
    df, y = data.read_labeled(data_url, info.classes)
    accelerator = runtime.make_accelerator()
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
            report.note_labels(spec.out, df),
            about={"model": model_url, "data": data_url},
        )
    accelerator.wait_for_everyone()
