"""The head job: the original classifier head on a frozen encoder (features cached once), or fine-tuning.

    medclf head jobs/mtsamples.yaml head.encoder=pretrained
    accelerate launch -m medclf head jobs/mtsamples.yaml head.encoder=adapted
    medclf head jobs/mtsamples.yaml head.encoder=org/some-bert head.name=some-bert head.freeze=false encoder_lr=2e-5

Writes <out>/head-<name>/{model/, metrics.json, report.md, confusion.png, spec.yaml}; a frozen
run also leaves its features under <out>/features/ for later heads, evaluate and compare.
Fine-tuning, which can run for hours, is preemptible as mlm is: checkpoints under
<out>/head-<name>/checkpoints/, `head.resume: auto`, and SIGTERM/SIGUSR1 saving and exiting 75.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import TensorDataset

from medclf import checkpoint, config, data, features, jobrecord, layout, report, runtime, storage
from medclf.classifier import (
    Classifier,
    ClassifierInfo,
    Head,
    check_max_length,
    encoder_reference,
    fingerprint,
    load_encoder,
    save,
)
from medclf.config import RunSpec
from medclf.errors import MedclfError
from medclf.training import Checkpoints, Notes, Standardizer, fit, probabilities

log = logging.getLogger(__name__)

# Fine-tuning warms the lr up over the first 10% of steps: Adam's first updates, before its moment
# estimates settle, are the ones that damage pretrained weights most.
FINE_TUNE_WARMUP = 0.1


def run(spec: RunSpec) -> None:
    # Fine-tuning can run for hours: SIGTERM/SIGUSR1 stop it with a checkpoint (exit 75), as mlm.
    # A frozen head trains in seconds on cached features and keeps the default handlers.
    if spec.head.freeze:
        _run(spec, None)
        return
    with runtime.StopSignal() as stop:
        _run(spec, stop)


def _run(spec: RunSpec, stop: Optional[runtime.StopSignal]) -> None:
    cfg, paths = spec.head, layout.Run.of(spec)
    name = cfg.name or head_name(cfg.encoder)
    out = paths.head(name)
    storage.check_writable(out)
    accelerator = runtime.make_accelerator(paths.out)  # before anything is read under out: all ranks see it

    # -- data: the prepared splits and their classes; every check before any model work
    classes, train, validation = data.read_splits(paths.out, spec.dataset, cfg.train, cfg.validation)
    seed = spec.seed if cfg.seed is None else cfg.seed
    train, dev = carve_dev(train, cfg.dev_fraction, seed, classes)

    # -- encoder and classifier (the head is seeded after the encoder: loading may draw random numbers)
    ref = encoder_reference(spec, cfg.encoder)
    inputs = jobrecord.split_inputs(
        paths.out, [cfg.train or paths.prepared_train, cfg.validation or paths.prepared_validation]
    )
    inputs["head.encoder"] = jobrecord.model_fingerprint(ref)
    # A folder holding only fine-tuning's checkpoints is an interrupted training (resume continues
    # it); anything else there without a record is refused.
    made = [out] if set(storage.listdir(out)) - {"checkpoints"} else []
    record = jobrecord.Record("head", paths.head_record(name), jobrecord.keys("head", spec), inputs, [out], made)
    if jobrecord.up_to_date(record, spec.overwrite, accelerator):
        return
    train_and_score: Callable[..., tuple] = _train_frozen
    if stop is not None:
        checkpoints = fine_tune_checkpoints(spec, name, record, accelerator, stop)
        train_and_score = functools.partial(_fine_tune, checkpoints=checkpoints)
    runtime.seed_everything(seed)  # weights a checkpoint lacks (a pooler) are initialised the same every run
    encoder, tokenizer, where = load_encoder(ref)
    check_max_length(cfg.max_length, where, ref, "head.max_length")
    runtime.seed_everything(seed)
    head = Head(encoder.config.hidden_size, len(classes), cfg.dropout)
    model = Classifier(encoder, head, cfg.pooling, cfg.freeze, cfg.window_pooling, max_windows=cfg.encode_batch_size)
    log.info(
        "head-%s: encoder %s, %d classes, %s, seed %d",
        name,
        ref,
        len(classes),
        "frozen (cached features)" if cfg.freeze else "fine-tuning everything",
        seed,
    )
    history: list[dict] = []
    head, probs, encoder_fingerprint = train_and_score(
        spec, accelerator, model, tokenizer, where, train, validation, dev, history
    )

    # -- save the classifier (main process), then its report on the validation split
    if accelerator.is_main_process:
        info = classifier_info(cfg, classes, ref, encoder_fingerprint, encoder.config.hidden_size)
        encoder_saved = None if cfg.freeze else model.encoder
        save(storage.join(out, "model"), head, info, encoder=encoder_saved, tokenizer=tokenizer)
        storage.write_text(storage.join(out, "spec.yaml"), config.to_yaml(spec))
        validation_url, validation_df, validation_y = validation
        report.write_report(
            out,
            f"head-{name} on {validation_url}",
            classes,
            validation_y,
            probs.argmax(1),
            report.note_labels(paths.out, validation_df, spec.dataset),
            about={"encoder": ref, "seed": seed, "freeze": cfg.freeze, **dev_about(cfg, train, dev, history)},
        )
        jobrecord.write(record)
    accelerator.wait_for_everyone()


def classifier_info(cfg, classes: list[str], ref: str, encoder_fingerprint: str, hidden_size: int) -> ClassifierInfo:
    """What classifier.json records of this head: a fine-tuned one carries its encoder in model/encoder/."""
    return ClassifierInfo(
        classes=classes,
        encoder="encoder" if not cfg.freeze else portable(ref),
        encoder_fingerprint=encoder_fingerprint,
        pooling=cfg.pooling,
        max_length=cfg.max_length,
        hidden_size=hidden_size,
        dropout=cfg.dropout,
        frozen=cfg.freeze,
        stride=cfg.stride,
        windows=cfg.windows,
        window_pooling=cfg.window_pooling,
    )


def _train_frozen(
    spec: RunSpec, accelerator, model: Classifier, tokenizer, where: str, train, validation, dev, history: list
):
    """Encode every distinct text once (cached), then train the head on the vectors (the best epoch
    on the dev fold kept, when there is one).

    Returns (head, validation probabilities, the encoder's fingerprint)."""
    cfg, seed = spec.head, spec.seed if spec.head.seed is None else spec.head.seed
    encoder_fingerprint = fingerprint(where)
    splits = [train[:2], validation[:2]] + ([dev[:2]] if dev is not None else [])
    train_x, validation_x, *dev_x = features.cached_splits(
        model, tokenizer, splits, cfg, config.required(spec.out, "out"), accelerator, encoder_fingerprint
    )
    scale = Standardizer(train_x, cfg.standardize)
    score = None
    if dev is not None:

        def score(head):
            return dev_scores(dev[2], probabilities(head, scale(dev_x[0]), accelerator).argmax(1))

    head = fit(
        accelerator,
        model.head,
        TensorDataset(scale(train_x), torch.tensor(train[2])),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        micro_batch_size=cfg.micro_batch_size,
        warmup_ratio=cfg.warmup_ratio,  # null: a constant lr, as the published frozen heads trained
        dev=score,
        history=history,
    )
    head = scale.fold(head)
    return head, probabilities(head, validation_x, accelerator), encoder_fingerprint


def fine_tune_checkpoints(
    spec: RunSpec, name: str, record: jobrecord.Record, accelerator, stop: runtime.StopSignal
) -> Checkpoints:
    """Fine-tuning's checkpoints under <out>/head-<name>/checkpoints and the one to resume from
    (head.resume, as mlm.resume). Each records the job's keys and input fingerprints: a checkpoint
    made with other settings or data is refused by name."""
    cfg, paths = spec.head, layout.Run.of(spec)
    root = paths.head_checkpoints(name)
    return Checkpoints(
        root=root,
        every=cfg.checkpoint_every,
        keep_last=cfg.keep_last,
        resume_url=checkpoint.choose(cfg.resume, root, spec.overwrite, accelerator, paths.head(name)),
        run=record.keys | record.inputs,
        spec_yaml=config.to_yaml(spec),
        stop=stop,
    )


def _fine_tune(
    spec: RunSpec,
    accelerator,
    model: Classifier,
    tokenizer,
    where: str,
    train,
    validation,
    dev,
    history: list,
    checkpoints: Checkpoints,
):
    """The loop runs through the encoder, every batch, every epoch, checkpointing as it goes;
    returns (head, probabilities, "")."""
    cfg, seed = spec.head, spec.seed if spec.head.seed is None else spec.head.seed
    _, train_df, train_y = train
    windows = features.windows_of(cfg)
    train_windows = features.tokenize_windows(tokenizer, train_df[data.TEXT].tolist(), windows)

    def vectors(trained: Classifier, df) -> torch.Tensor:
        return features.encode(trained, tokenizer, df[data.TEXT].tolist(), windows, cfg.encode_batch_size, accelerator)

    def score(trained: Classifier) -> dict:
        return dev_scores(dev[2], probabilities(trained.head, vectors(trained, dev[1]), accelerator).argmax(1))

    model = fit(
        accelerator,
        model,
        Notes(train_windows, train_y, tokenizer.pad_token_id),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        micro_batch_size=cfg.micro_batch_size,
        encoder_lr=cfg.encoder_lr,
        warmup_ratio=FINE_TUNE_WARMUP if cfg.warmup_ratio is None else cfg.warmup_ratio,
        dev=score if dev is not None else None,
        history=history,
        checkpoints=checkpoints,
    )
    return model.head, probabilities(model.head, vectors(model, validation[1]), accelerator), ""


# ---------------------------------------------------------------- the dev fold


def carve_dev(train, fraction: float, seed: int, classes: list[str]):
    """(train minus dev, dev) as (url, frame, labels) each: a grouped, seeded dev fold of `fraction`
    of the training notes (no note on both sides), or (train, None) when fraction is 0."""
    if not fraction:
        return train, None
    url, df, y = train
    if "text_id" not in df.columns:
        df = df.assign(text_id=df[data.TEXT].map(data.text_id))
    _, held = data.split_grouped(df, fraction, seed)
    in_dev = df["text_id"].isin(set(held["text_id"])).to_numpy()
    for side, rows in (("fit", ~in_dev), ("dev", in_dev)):
        missing = [c for i, c in enumerate(classes) if not (y[rows] == i).any()]
        if missing:
            raise MedclfError(
                f"head.dev_fraction={fraction}: the {side} part of {url} has no note of class {missing[0]}; "
                "choose another fraction (or 0: no dev fold)"
            )
    return (url, df[~in_dev], y[~in_dev]), (f"{url} (dev fold)", df[in_dev], y[in_dev])


def dev_scores(y: np.ndarray, predicted: np.ndarray) -> dict:
    labels = sorted(set(y.tolist()) | set(predicted.tolist()))
    return {
        "accuracy": float((predicted == y).mean()),
        "f1_weighted": float(f1_score(y, predicted, labels=labels, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(y, predicted, labels=labels, average="macro", zero_division=0)),
    }


def dev_about(cfg, train, dev, history: list[dict]) -> dict:
    """metrics.json's record of training: each epoch's loss (and dev scores), the epoch kept."""
    if dev is None:
        return {"epochs": history, "dev": None}
    best = max(history, key=lambda h: h["dev_f1_weighted"])  # the first of equals, as fit keeps it
    return {
        "epochs": history,
        "dev": {
            "fraction": cfg.dev_fraction,
            "fit_rows": len(train[2]),
            "dev_rows": len(dev[2]),
            "fit_notes": int(train[1]["text_id"].nunique()),
            "dev_notes": int(dev[1]["text_id"].nunique()),
            "best_epoch": best["epoch"],
            "f1_weighted": best["dev_f1_weighted"],
            "accuracy": best["dev_accuracy"],
        },
    }


# ---------------------------------------------------------------- output names


def head_name(encoder: str) -> str:
    """The output folder's name for an encoder keyword or reference: `adapted`, `org-some-bert`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "head"


def portable(ref: str) -> str:
    """A reference that still works from another working directory: local folders made absolute."""
    path = storage.local_path(ref)
    if storage.is_local(ref) and os.path.isdir(path):
        return os.path.abspath(path)
    return ref
