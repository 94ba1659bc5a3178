"""The supervised loop the head and compare jobs share: cross-entropy on (inputs..., label) batches.

A head on cached features and a fine-tuned classifier (encoder and head) train with the same
`fit`; `probabilities` scores a trained head on feature vectors.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medclf import features, runtime
from medclf.classifier import Head
from medclf.errors import MedclfError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def fit(
    accelerator: Accelerator,
    model: ModuleT,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    validation: tuple[torch.Tensor, np.ndarray] | None = None,
    dev: Optional[Callable[[ModuleT], dict]] = None,
    history: Optional[list] = None,
) -> ModuleT:
    """Cross-entropy training of `model` on (inputs..., label) batches; returns the unwrapped model.

    The head on cached features and the fine-tuned classifier share this loop. `batch_size` is
    the global batch: each of N processes takes batch_size / N examples per step. `dev` scores
    the (unwrapped) model after each epoch ({"f1_weighted": ..., ...}); the model returned then
    has the weights of the epoch with the best dev weighted F1 (the first of equals). Each
    epoch's log line is appended to `history`.
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

    best: tuple[float, int, dict] | None = None
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
