"""The supervised loop the head and compare jobs share: cross-entropy on (inputs..., label) batches.

A head on cached features and a fine-tuned classifier (encoder and head) train with the same
`fit`; `probabilities` scores a trained head on feature vectors. Fine-tuning, which can run for
hours, checkpoints through medclf/checkpoint.py as mlm does, and resumes exactly: the data order
(the loader's generator), the dropout RNG, the optimizer and schedule, the epoch's loss so far and
the best dev epoch all come back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from medclf import checkpoint, features, runtime
from medclf.classifier import Head
from medclf.errors import MedclfError, Preempted
from medclf.optim import adamw, decay_groups, warmup_then_decay

log = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# AdamW's default decay, which the head has always trained with; fine-tuning spares the 1-d parameters.
WEIGHT_DECAY = 0.01


@dataclass
class Checkpoints:
    """Where and how often fine-tuning checkpoints, what it resumes from (None: a fresh start), the
    settings and inputs every checkpoint records (one made otherwise is refused), the resolved spec
    saved with each, and the stop signal (SIGTERM/SIGUSR1) the loop obeys."""

    root: str
    every: int
    keep_last: int
    resume_url: Optional[str]
    run: dict
    spec_yaml: str
    stop: runtime.StopSignal


@dataclass
class FitState(checkpoint.State):
    """What fit carries from step to step (step, run, world_size: checkpoint.State); a fine-tuning
    checkpoint's state, its tensors in state.safetensors."""

    epochs_done: int = 0  # epochs finished, their dev scoring included
    history: list = field(default_factory=list)  # each finished epoch's log line
    best: Optional[dict] = None  # {"f1", "epoch", "weights"}: the best dev epoch so far (the first of equals)
    # this epoch's summed training loss and rows so far, per rank (a checkpoint holds all ranks' loss)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    rows: int = 0
    data_rng: Optional[torch.Tensor] = None  # the loader's generator where this epoch's order begins (or the next's)


@dataclass
class Loop:
    """The prepared pieces one fit works with."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any
    generator: torch.Generator  # the loader's shuffling RNG: the data order
    total_steps: int
    checkpoints: Optional[Checkpoints]
    progress: runtime.Progress = field(init=False)  # made once the starting step is known


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
    checkpoints: Optional[Checkpoints] = None,
) -> ModuleT:
    """Cross-entropy training of `model` on (inputs..., label) batches; returns the unwrapped model.

    The head on cached features and the fine-tuned classifier share this loop. `batch_size` is
    the global batch of one optimizer step: each of N processes takes batch_size / N examples per
    step, in forward passes of `micro_batch_size` (None: all at once). `warmup_ratio` (None: a
    constant lr) warms the lr up linearly, then decays it linearly to 0 after the last step.
    `encoder_lr` is the lr of a fine-tuned encoder's parameters (None: `lr`, as for the rest).
    `dev` scores the (unwrapped) model after each epoch ({"f1_weighted": ..., ...}); the model
    returned then has the weights of the epoch with the best dev weighted F1 (the first of equals).
    Each epoch's log line is appended to `history`. With `checkpoints` (fine-tuning), the loop
    checkpoints on schedule, resumes from `checkpoints.resume_url` exactly where that run stood,
    and after a stop signal saves a checkpoint of the step reached and raises Preempted.
    """
    world = accelerator.num_processes
    generator = torch.Generator().manual_seed(seed)  # the data order: a checkpoint keeps its state
    loader = _loader(dataset, batch_size, micro_batch_size, world, seed, generator)
    optimizer = _optimizer(model, lr, encoder_lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # The scheduler stays unprepared: Accelerate would step it once per process.
    raw = optimizer.optimizer  # the prepared loader's length is known now; the schedule drives the real optimizer
    scheduler = None if warmup_ratio is None else warmup_then_decay(raw, warmup_ratio, epochs * len(loader))
    loop = Loop(accelerator, model, optimizer, scheduler, loader, generator, epochs * len(loader), checkpoints)
    state = _resume(loop)  # late: nothing may draw from the RNGs it restores before the first step
    loop.progress = runtime.Progress(accelerator, total=loop.total_steps, start=state.step, desc="head", unit="notes")
    # A head on cached features multiplies tiny matrices: on CPU, handing them to several threads
    # costs more than the arithmetic (25-60x slower on a busy 2-core machine), so it uses one.
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu" and isinstance(accelerator.unwrap_model(model), Head):
        torch.set_num_threads(1)

    for epoch in range(state.epochs_done + 1, epochs + 1):
        loss = _train_epoch(loop, state)
        _end_epoch(loop, state, epoch, loss, validation, dev)
        _checkpoint_or_stop(loop, state)  # an epoch's last step checkpoints here, with its dev score
    unwrapped = accelerator.unwrap_model(model)
    if state.best is not None:
        unwrapped.load_state_dict(state.best["weights"])
        loop.progress.log(best_epoch=state.best["epoch"], dev_f1_weighted=state.best["f1"])
    loop.progress.close()
    torch.set_num_threads(threads)
    if history is not None:
        history.extend(state.history)
    return unwrapped


def _loader(
    dataset: Dataset,
    batch_size: int,
    micro_batch_size: Optional[int],
    world: int,
    seed: int,
    generator: torch.Generator,
) -> DataLoader:
    """Shuffled batches (in `generator`'s order) of batch_size / world examples per process, each as
    its micro-batches."""
    if batch_size % world:
        raise MedclfError(f"head.batch_size={batch_size} is not a multiple of the {world} processes")
    micro = micro_batch_size or batch_size // world
    runtime.accumulation_steps(batch_size, micro, world, key="head.batch_size")  # refuses a split that cannot be
    runtime.seed_everything(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size // world,
        shuffle=True,
        generator=generator,
        # each of a process's batches comes as its micro-batches, collated one by one
        collate_fn=functools.partial(_micro_batches, getattr(dataset, "collate", default_collate), micro),
    )


def _train_epoch(loop: Loop, state: FitState) -> float:
    """One pass over the loader (what is left of it, resumed mid-epoch): per batch, forward and
    backward per micro-batch, then one optimizer (and schedule) step. Returns the mean training
    loss over all ranks."""
    accelerator, steps = loop.accelerator, len(loop.loader)
    done = state.step - state.epochs_done * steps  # batches of this epoch trained before a resume
    if not done:
        state.data_rng = loop.generator.get_state()  # the epoch's order comes from here: a resume replays it
        state.loss_sum, state.rows = torch.zeros((), device=accelerator.device), 0
    loop.model.train()
    sleep = runtime.step_sleep() if loop.checkpoints else 0.0
    for i, micro_batches in enumerate(loop.loader):
        if i < done:
            continue  # the same batches, in the same order, as the interrupted run trained on
        loss_sum, rows = _accumulate(accelerator, loop.model, micro_batches)
        loop.optimizer.step()
        if loop.scheduler is not None:
            loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.loss_sum += loss_sum
        state.rows += rows
        loop.progress.update(rows * accelerator.num_processes, loss=loss_sum.item() / rows)
        if sleep:
            time.sleep(sleep)
        if i + 1 < steps:
            _checkpoint_or_stop(loop, state)
    state.data_rng = loop.generator.get_state()  # where the next epoch's order begins
    return float(accelerator.reduce(state.loss_sum, "sum")) / max(state.rows * accelerator.num_processes, 1)


def _end_epoch(loop: Loop, state: FitState, epoch: int, loss: float, validation, dev) -> None:
    """The epoch's log line (loss, lr, validation accuracy, dev scores) into the history, and the
    best dev epoch's weights kept."""
    accelerator, model = loop.accelerator, loop.model
    scalars: dict[str, float] = {"epoch": epoch, "loss": loss}
    if loop.scheduler is not None:
        scalars["lr"] = float(loop.scheduler.get_last_lr()[-1])  # the head's lr for the next step: 0 after the last
    if validation is not None:
        scalars["val_acc"] = _accuracy(accelerator, model, *validation)
    if dev is not None:
        scores = dev(accelerator.unwrap_model(model))
        scalars |= {f"dev_{k}": v for k, v in scores.items()}
        if state.best is None or scores["f1_weighted"] > state.best["f1"]:
            weights = accelerator.unwrap_model(model).state_dict()
            state.best = {"f1": scores["f1_weighted"], "epoch": epoch, "weights": _copy(weights)}
    loop.progress.log(**scalars)
    state.history.append(scalars)
    state.epochs_done = epoch


def _copy(weights: dict) -> dict:
    return {k: v.detach().clone() for k, v in weights.items()}


# ---------------------------------------------------------------- checkpoints (fine-tuning)


def _resume(loop: Loop) -> FitState:
    """A fresh state, or the weights, optimizer, schedule, every rank's RNG, the data order and the
    epoch's progress restored from the checkpoint to resume (refused when made with other settings)."""
    c, accelerator = loop.checkpoints, loop.accelerator
    if c is None or c.resume_url is None:
        return FitState(run=c.run if c else {})
    saved = checkpoint.resume(
        c.resume_url,
        accelerator,
        model=accelerator.unwrap_model(loop.model),
        optimizer=loop.optimizer,
        scheduler=loop.scheduler,
        run=c.run,
    )
    state = FitState.from_json(saved)
    # The epoch's loss so far was summed over all ranks when saved: the main process carries it on.
    assert state.data_rng is not None
    main = accelerator.is_main_process
    state.loss_sum = state.loss_sum.to(accelerator.device) if main else torch.zeros((), device=accelerator.device)
    loop.generator.set_state(state.data_rng)
    log.info("resumed from %s at step %d (epoch %d)", c.resume_url, state.step, state.epochs_done + 1)
    return state


def _checkpoint_or_stop(loop: Loop, state: FitState) -> None:
    """A checkpoint every `every` steps and at the last; after a stop signal (all ranks agree), a
    checkpoint of the step reached, then Preempted. Nothing without checkpoints (frozen heads)."""
    c, total = loop.checkpoints, loop.total_steps
    if c is None:
        return
    saved = state.step % c.every == 0 or state.step == total
    if saved:
        _save(loop, state)
    if state.step < total and c.stop.requested(loop.accelerator):
        url = checkpoint.step_url(c.root, state.step) if saved else _save(loop, state)
        loop.progress.close()
        raise Preempted(f"stopped at step {state.step}/{total}; checkpoint {url}")


def _save(loop: Loop, state: FitState) -> str:
    """A checkpoint of the step reached (every rank calls this); returns its URL."""
    c, accelerator = loop.checkpoints, loop.accelerator
    assert c is not None
    saved = dict(vars(state), loss_sum=accelerator.reduce(state.loss_sum.clone(), "sum"))
    return checkpoint.save(
        c.root,
        state.step,
        accelerator,
        model=accelerator.unwrap_model(loop.model),
        optimizer=loop.optimizer,
        scheduler=loop.scheduler,
        state=saved,
        spec_yaml=c.spec_yaml,
        keep_last=c.keep_last,
    )


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
