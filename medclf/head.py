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

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medclf import config, data, evaluate, features, manifest, runtime, storage
from medclf.classifier import Classifier, ClassifierInfo, Head, check_max_length, fingerprint, load_encoder, save
from medclf.config import RunSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    cfg = spec.head
    name = cfg.name or head_name(cfg.encoder)
    out = storage.join(spec.out, f"head-{name}")
    storage.check_output(out, spec.overwrite)

    # -- data: the prepared splits and their classes; every check before any model work
    classes, (train_url, train_df, train_y), (validation_url, validation_df, validation_y) = data.read_splits(
        spec.out, cfg.train, cfg.validation
    )
    seed = spec.seed if cfg.seed is None else cfg.seed

    # -- encoder and classifier (the head is seeded after the encoder: loading may draw random numbers)
    accelerator = runtime.make_accelerator()
    ref = encoder_reference(spec, cfg.encoder)
    encoder, tokenizer, where = load_encoder(ref)
    check_max_length(cfg.max_length, where, ref, "head.max_length")
    runtime.seed_everything(seed)
    head = Head(encoder.config.hidden_size, len(classes), cfg.dropout)
    model = Classifier(encoder, head, cfg.pooling, frozen=cfg.freeze)
    log.info(
        "head-%s: encoder %s, %d classes, %s, seed %d",
        name,
        ref,
        len(classes),
        "frozen (cached features)" if cfg.freeze else "fine-tuning everything",
        seed,
    )

    if cfg.freeze:
        # -- frozen: encode every distinct text once, then train the head on the vectors
        encoder_fingerprint = fingerprint(where)
        cached = dict(
            max_length=cfg.max_length,
            batch_size=cfg.encode_batch_size,
            accelerator=accelerator,
            cache_dir=storage.join(spec.out, "features"),
            encoder_fingerprint=encoder_fingerprint,
        )
        train_x = features.cached_encode(model, tokenizer, train_df[data.TEXT].tolist(), source=train_url, **cached)
        validation_x = features.cached_encode(
            model, tokenizer, validation_df[data.TEXT].tolist(), source=validation_url, **cached
        )
        head = fit(
            accelerator,
            head,
            TensorDataset(train_x, torch.tensor(train_y)),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
            validation=(validation_x, validation_y),
        )
        with torch.no_grad():
            probs = torch.softmax(head.eval()(validation_x.to(accelerator.device)).float().cpu(), -1).numpy()
    else:
        # -- fine-tuning: the loop runs through the encoder, every batch, every epoch
        encoder_fingerprint = ""
        train_ids = tokenizer(train_df[data.TEXT].tolist(), truncation=True, max_length=cfg.max_length)["input_ids"]
        model = fit(
            accelerator,
            model,
            Notes(train_ids, train_y, tokenizer.pad_token_id),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
        )
        head = model.head
        vectors = features.encode(
            model, tokenizer, validation_df[data.TEXT].tolist(), cfg.max_length, cfg.encode_batch_size, accelerator
        )
        with torch.no_grad():
            probs = torch.softmax(head.eval()(vectors.to(accelerator.device)).float().cpu(), -1).numpy()

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
        )
        save(storage.join(out, "model"), head, info, encoder=None if cfg.freeze else model.encoder, tokenizer=tokenizer)
        storage.write_text(storage.join(out, "spec.yaml"), config.to_yaml(spec))
        label_sets = evaluate.note_labels(spec.out, validation_df)
        evaluate.write_report(
            out,
            f"head-{name} on {validation_url}",
            classes,
            validation_y,
            probs.argmax(1),
            label_sets,
            about={"encoder": ref, "seed": seed, "freeze": cfg.freeze},
        )
    accelerator.wait_for_everyone()


def fit(
    accelerator: Accelerator,
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    validation: tuple[torch.Tensor, np.ndarray] | None = None,
) -> nn.Module:
    """Cross-entropy training of `model` on (inputs..., label) batches; returns the unwrapped model.

    The head on cached features and the fine-tuned classifier share this loop. `batch_size` is
    the global batch: each of N processes takes batch_size / N examples per step.
    """
    world = accelerator.num_processes
    if batch_size % world:
        raise MedclfError(f"head.batch_size={batch_size} is not a multiple of the {world} processes")
    runtime.seed_everything(seed)
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size // world,
        shuffle=True,
        generator=order,
        collate_fn=getattr(dataset, "collate", None),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()
    progress = runtime.Progress(accelerator, total=epochs * len(loader), desc="head", unit="notes")
    # A head on cached features multiplies tiny matrices: on CPU, handing them to several threads
    # costs more than the arithmetic (25-60x slower on a busy 2-core machine), so it uses one.
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu" and isinstance(accelerator.unwrap_model(model), Head):
        torch.set_num_threads(1)

    for epoch in range(1, epochs + 1):
        model.train()
        total, count = torch.zeros((), device=accelerator.device), 0
        for *inputs, labels in loader:
            # -- forward, backward, step
            loss = loss_fn(model(*inputs).float(), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach() * len(labels)
            count += len(labels)
            progress.update(len(labels) * world, loss=loss.item())

        # -- log: mean training loss over all ranks, and validation accuracy when features are at hand
        scalars = {"epoch": epoch, "loss": float(accelerator.reduce(total, "sum")) / max(count * world, 1)}
        if validation is not None:
            model.eval()
            with torch.no_grad():
                predicted = model(validation[0].to(accelerator.device)).argmax(-1).cpu().numpy()
            scalars["val_acc"] = float((predicted == validation[1]).mean())
        progress.log(**scalars)
    progress.close()
    torch.set_num_threads(threads)
    return accelerator.unwrap_model(model)


class Notes(Dataset):
    """Tokenized notes and labels for fine-tuning; batches padded to their longest note."""

    def __init__(self, ids: list[list[int]], labels: np.ndarray, pad_id: int):
        self.ids, self.labels, self.pad_id = ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], int(self.labels[i])

    def collate(self, batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, mask = features.pad([ids for ids, _ in batch], self.pad_id)
        return input_ids, mask, torch.tensor([label for _, label in batch])


# ---------------------------------------------------------------- encoder references


def encoder_reference(spec: RunSpec, encoder: str) -> str:
    """pretrained -> mlm.model; adapted -> <out>/mlm/model (which must exist); else the reference itself."""
    if encoder == "pretrained":
        return spec.mlm.model
    if encoder == "adapted":
        ref = storage.join(spec.out, "mlm", "model")
        if not manifest.exists(ref):  # written last: the model is complete
            raise MedclfError(f"head.encoder=adapted: {ref} has no model yet; run `medclf mlm` first")
        return ref
    return encoder


def head_name(encoder: str) -> str:
    """The output folder's name for an encoder keyword or reference: `adapted`, `org-some-bert`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "head"


def portable(ref: str) -> str:
    """A reference that still works from another working directory: local folders made absolute."""
    path = storage.local_path(ref)
    if storage.is_local(ref) and os.path.isdir(path):
        return os.path.abspath(path)
    return ref
