"""The head job: the original classifier head on a frozen encoder (features cached once), or fine-tuning.

    medclf head jobs/mtsamples.yaml head.encoder=pretrained
    accelerate launch -m medclf head jobs/mtsamples.yaml head.encoder=adapted
    medclf head jobs/mtsamples.yaml head.encoder=org/some-bert head.name=some-bert head.freeze=false lr=2e-5

Writes <out>/head-<name>/{model/, metrics.json, report.md, confusion.png, spec.yaml}; a frozen
run also leaves its features under <out>/features/ for later heads, evaluate and compare.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from torch.utils.data import TensorDataset

from medclf import config, data, features, layout, report, runtime, storage
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
from medclf.training import Notes, fit, probabilities

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    cfg, paths = spec.head, layout.Run(spec.out)
    name = cfg.name or head_name(cfg.encoder)
    out = paths.head(name)
    storage.check_output(out, spec.overwrite)

    # -- data: the prepared splits and their classes; every check before any model work
    classes, train, validation = data.read_splits(spec.out, cfg.train, cfg.validation)
    seed = spec.seed if cfg.seed is None else cfg.seed

    # -- encoder and classifier (the head is seeded after the encoder: loading may draw random numbers)
    accelerator = runtime.make_accelerator()
    ref = encoder_reference(spec, cfg.encoder)
    encoder, tokenizer, where = load_encoder(ref)
    check_max_length(cfg.max_length, where, ref, "head.max_length")
    runtime.seed_everything(seed)
    head = Head(encoder.config.hidden_size, len(classes), cfg.dropout)
    model = Classifier(encoder, head, cfg.pooling, cfg.freeze, cfg.window_pooling)
    log.info(
        "head-%s: encoder %s, %d classes, %s, seed %d",
        name,
        ref,
        len(classes),
        "frozen (cached features)" if cfg.freeze else "fine-tuning everything",
        seed,
    )
    train_and_score = _train_frozen if cfg.freeze else _fine_tune
    head, probs, encoder_fingerprint = train_and_score(spec, accelerator, model, tokenizer, where, train, validation)

    # -- save the classifier (main process), then its report on the validation split
    if accelerator.is_main_process:
        info = ClassifierInfo(
            classes=classes,
            encoder="encoder" if not cfg.freeze else portable(ref),
            encoder_fingerprint=encoder_fingerprint,
            pooling=cfg.pooling,
            max_length=cfg.max_length,
            hidden_size=encoder.config.hidden_size,
            dropout=cfg.dropout,
            frozen=cfg.freeze,
            stride=cfg.stride,
            windows=cfg.windows,
            window_pooling=cfg.window_pooling,
        )
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
            report.note_labels(spec.out, validation_df),
            about={"encoder": ref, "seed": seed, "freeze": cfg.freeze},
        )
    accelerator.wait_for_everyone()


def _train_frozen(spec: RunSpec, accelerator, model: Classifier, tokenizer, where: str, train, validation):
    """Encode every distinct text once (cached), then train the head on the vectors.

    Returns (head, validation probabilities, the encoder's fingerprint)."""
    cfg, seed = spec.head, spec.seed if spec.head.seed is None else spec.head.seed
    encoder_fingerprint = fingerprint(where)
    splits = [train[:2], validation[:2]]
    train_x, validation_x = features.cached_splits(
        model, tokenizer, splits, cfg, spec.out, accelerator, encoder_fingerprint
    )
    head = fit(
        accelerator,
        model.head,
        TensorDataset(train_x, torch.tensor(train[2])),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        validation=(validation_x, validation[2]),
    )
    return head, probabilities(head, validation_x, accelerator), encoder_fingerprint


def _fine_tune(spec: RunSpec, accelerator, model: Classifier, tokenizer, where: str, train, validation):
    """The loop runs through the encoder, every batch, every epoch; returns (head, probabilities, "")."""
    cfg, seed = spec.head, spec.seed if spec.head.seed is None else spec.head.seed
    _, train_df, train_y = train
    windows = features.windows_of(cfg)
    train_windows = features.tokenize_windows(tokenizer, train_df[data.TEXT].tolist(), windows)
    model = fit(
        accelerator,
        model,
        Notes(train_windows, train_y, tokenizer.pad_token_id),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
    )
    texts = validation[1][data.TEXT].tolist()
    vectors = features.encode(model, tokenizer, texts, windows, cfg.encode_batch_size, accelerator)
    return model.head, probabilities(model.head, vectors, accelerator), ""


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
