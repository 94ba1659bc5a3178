"""The supervised loop the head and compare jobs share: cross-entropy on (inputs..., label) batches.

A head on cached features and a fine-tuned classifier (encoder and head) train with the same
`fit`; `probabilities` scores a trained head on feature vectors.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from medclf import features, runtime
from medclf.classifier import Head
from medclf.errors import MedclfError
from medclf.optim import adamw, decay_groups, warmup_then_decay

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# AdamW's default decay, which the head has always trained with; fine-tuning spares the 1-d parameters.
WEIGHT_DECAY = 0.01


def fit(
    accelerator: Accelerator,
    model: ModuleT,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    micro_batch_size: Optional[int] = None,
    encoder_lr: Optional[float] = None,
    warmup_ratio: Optional[float] = None,
    validation: tuple[torch.Tensor, np.ndarray] | None = None,
    dev: Optional[Callable[[ModuleT], dict]] = None,
    history: Optional[list] = None,
) -> ModuleT:
    """Cross-entropy training of `model` on (inputs..., label) batches; returns the unwrapped model.

    The head on cached features and the fine-tuned classifier share this loop. `batch_size` is
    the global batch of one optimizer step: each of N processes takes batch_size / N examples per
    step, in forward passes of `micro_batch_size` (None: all at once). `warmup_ratio` (None: a
    constant lr) warms the lr up linearly, then decays it linearly to 0 after the last step.
    `encoder_lr` is the lr of a fine-tuned encoder's parameters (None: `lr`, as for the rest).
    `dev` scores the (unwrapped) model after each epoch ({"f1_weighted": ..., ...}); the model
    returned then has the weights of the epoch with the best dev weighted F1 (the first of equals).
    Each epoch's log line is appended to `history`.
    """
    world = accelerator.num_processes
    loader = _loader(dataset, batch_size, micro_batch_size, world, seed)
    optimizer = _optimizer(model, lr, encoder_lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # The scheduler stays unprepared: Accelerate would step it once per process.
    raw = optimizer.optimizer  # the prepared loader's length is known now; the schedule drives the real optimizer
    scheduler = None if warmup_ratio is None else warmup_then_decay(raw, warmup_ratio, epochs * len(loader))
    progress = runtime.Progress(accelerator, total=epochs * len(loader), desc="head", unit="notes")
    # A head on cached features multiplies tiny matrices: on CPU, handing them to several threads
    # costs more than the arithmetic (25-60x slower on a busy 2-core machine), so it uses one.
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu" and isinstance(accelerator.unwrap_model(model), Head):
        torch.set_num_threads(1)

    best: tuple[float, int, dict] | None = None
    for epoch in range(1, epochs + 1):
        loss = _train_epoch(accelerator, model, optimizer, scheduler, loader, progress)
        scalars: dict[str, float] = {"epoch": epoch, "loss": loss}
        if scheduler is not None:
            scalars["lr"] = float(scheduler.get_last_lr()[-1])  # the head's lr for the next step: 0 after the last
        if validation is not None:
            scalars["val_acc"] = _accuracy(accelerator, model, *validation)
        if dev is not None:
            scores = dev(accelerator.unwrap_model(model))
            scalars |= {f"dev_{k}": v for k, v in scores.items()}
            if best is None or scores["f1_weighted"] > best[0]:
                state = accelerator.unwrap_model(model).state_dict()
                best = (scores["f1_weighted"], epoch, {k: v.detach().clone() for k, v in state.items()})
        progress.log(**scalars)
        if history is not None:
            history.append(scalars)
    unwrapped = accelerator.unwrap_model(model)
    if best is not None:
        unwrapped.load_state_dict(best[2])
        progress.log(best_epoch=best[1], dev_f1_weighted=best[0])
    progress.close()
    torch.set_num_threads(threads)
    return unwrapped


def _loader(dataset: Dataset, batch_size: int, micro_batch_size: Optional[int], world: int, seed: int) -> DataLoader:
    """Shuffled (seeded) batches of batch_size / world examples per process, each as its micro-batches."""
    if batch_size % world:
        raise MedclfError(f"head.batch_size={batch_size} is not a multiple of the {world} processes")
    micro = micro_batch_size or batch_size // world
    runtime.accumulation_steps(batch_size, micro, world, key="head.batch_size")  # refuses a split that cannot be
    runtime.seed_everything(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size // world,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        # each of a process's batches comes as its micro-batches, collated one by one
        collate_fn=functools.partial(_micro_batches, getattr(dataset, "collate", default_collate), micro),
    )


def _train_epoch(accelerator: Accelerator, model, optimizer, scheduler, loader, progress) -> float:
    """One pass over the loader: per batch, forward and backward per micro-batch, then one optimizer
    (and schedule) step. Returns the mean training loss over all ranks."""
    model.train()
    total, count = torch.zeros((), device=accelerator.device), 0
    for micro_batches in loader:
        loss_sum, rows = _accumulate(accelerator, model, micro_batches)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss_sum
        count += rows
        progress.update(rows * accelerator.num_processes, loss=loss_sum.item() / rows)
    return float(accelerator.reduce(total, "sum")) / max(count * accelerator.num_processes, 1)


def _accuracy(accelerator: Accelerator, model, vectors: torch.Tensor, labels: np.ndarray) -> float:
    """Accuracy on feature vectors at hand (logged only; nothing is chosen by it)."""
    model.eval()
    with torch.no_grad():
        predicted = model(vectors.to(accelerator.device)).argmax(-1).cpu().numpy()
    return float((predicted == labels).mean())


def _micro_batches(collate: Callable, size: int, items: list) -> list:
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


def _accumulate(accelerator: Accelerator, model: nn.Module, micro_batches: list) -> tuple[torch.Tensor, int]:
    """Gradients of one process's batch, summed over its micro-batches; returns (the batch's summed
    loss, its rows).

    Each micro-batch's mean loss is weighted by its share of the batch's rows, so the gradient is
    the batch's mean whatever the split (DDP then averages the equal-sized batches of the ranks).
    Gradients are all-reduced once, with the last micro-batch. (Not accelerator.accumulate: its
    end-of-dataloader rule would step after every micro-batch of an epoch's last batch.)"""
    rows = sum(len(labels) for *_, labels in micro_batches)
    total = torch.zeros((), device=accelerator.device)
    for i, (*inputs, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():  # bf16 where accelerate_config.yaml asks for it; a no-op on CPU
                logits = model(*inputs)
            loss = nn.functional.cross_entropy(logits.float(), labels)
            accelerator.backward(loss * (len(labels) / rows))
        total += loss.detach() * len(labels)
    return total, rows


def _optimizer(model: nn.Module, lr: float, encoder_lr: Optional[float]) -> torch.optim.Optimizer:
    """A frozen encoder's head: AdamW on its parameters as they are (the published frozen results).
    Fine-tuning: AdamW without decay on biases and LayerNorm weights (as mlm), `encoder_lr` for
    the encoder's parameters and `lr` for the head's."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not any(p.requires_grad for p in encoder.parameters()):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    head = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    groups = decay_groups(encoder.parameters(), WEIGHT_DECAY, lr=encoder_lr or lr)
    return adamw(groups + decay_groups(head, WEIGHT_DECAY, lr=lr), lr=lr)


class Standardizer:
    """(x - mean) / sd with the training vectors' per-feature statistics; identity when off.

    A head trains faster and steadier on standardized features (dev fold, README). `fold` then moves
    the scaling into the head's first layer (W' = W / sd, b' = b - W' mean), so the saved head reads
    raw features and evaluate, predict and the classifier format need not know about it. Off, mean 0
    and sd 1 make every step exact, so the results are bit-identical to no standardizing.
    """

    def __init__(self, train_x: torch.Tensor, on: bool):
        dim = train_x.shape[1]
        self.mean = train_x.mean(0) if on else torch.zeros(dim)
        self.sd = train_x.std(0).clamp(min=1e-6) if on else torch.ones(dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.sd

    def fold(self, head: Head) -> Head:
        first = head.layers[0]
        assert isinstance(first, nn.Linear)
        with torch.no_grad():
            first.weight.div_(self.sd)
            first.bias.sub_(first.weight @ self.mean)
        return head


class Notes(Dataset):
    """Notes as windows of token ids, and their labels, for fine-tuning. A batch holds every window
    of its notes (padded to the longest) and the window count per note, which the classifier pools
    by before its head."""

    def __init__(self, windows: list[list[list[int]]], labels: np.ndarray, pad_id: int):
        self.windows, self.labels, self.pad_id = windows, labels, pad_id

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[list[list[int]], int]:
        return self.windows[i], int(self.labels[i])

    def collate(self, batch: list[tuple[list[list[int]], int]]) -> tuple[torch.Tensor, ...]:
        input_ids, mask = features.pad([w for windows, _ in batch for w in windows], self.pad_id)
        counts = torch.tensor([len(windows) for windows, _ in batch])
        return input_ids, mask, counts, torch.tensor([label for _, label in batch])


def probabilities(head: nn.Module, vectors: torch.Tensor, accelerator: Accelerator) -> np.ndarray:
    """Class probabilities [rows, classes] of a trained head on feature vectors (eval mode, CPU)."""
    with torch.no_grad():
        return torch.softmax(head.eval()(vectors.to(accelerator.device)).float().cpu(), -1).numpy()
