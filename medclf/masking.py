"""Masked-LM batches: full blocks of the token stream (medclf/tokenstore.py) -> masks -> step batches.

Masks are a pure function of (seed, epoch, block index): every rank can build any block's
masks without talking to the others, a resumed run rebuilds exactly the masks it would have
seen, and the evaluation masks (epoch -1, `eval_seed`) are the same for every run and process
count. So a DataLoader's workers can build the batches of the coming steps while the model
trains (`step_loader`): a batch is a function of the step alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

IGNORE = -100  # label of positions that carry no loss (the convention of torch's cross_entropy)
PREFETCH = 4  # global batches each DataLoader worker prepares ahead


def pack(stream: torch.Tensor, block: int) -> torch.Tensor:
    """Full blocks of `block` tokens, no padding; the tail shorter than a block is dropped."""
    n = len(stream) // block
    return stream[: n * block].view(n, block)


# ---------------------------------------------------------------- masks


@dataclass
class Masker:
    """15% of tokens (or of words) chosen; of those 80% become [MASK], 10% a random token, 10% stay."""

    mask_token_id: int
    vocab_size: int
    special_ids: list[int]
    probability: float = 0.15
    whole_word: bool = False

    def __post_init__(self) -> None:
        # A lookup table of the special ids: np.isin costs more than drawing the block's masks.
        self._special = np.zeros(max(self.special_ids, default=-1) + 2, dtype=np.bool_)
        self._special[self.special_ids] = True

    def _selected(self, ids: Any, word_start: Any, seed: int, epoch: int, index: int):
        """The block's generator (its first draw taken), ids as int64, and the positions chosen."""
        rng = np.random.default_rng([seed, epoch + 1, index])
        ids_np = np.asarray(ids, dtype=np.int64)  # no copy of the int64 blocks the token store gives
        draw_select = rng.random(len(ids_np))
        if self.whole_word:
            # All pieces of a word share the draw of its first piece.
            word = np.cumsum(np.asarray(word_start)) - 1
            word = word - word.min()
            selected = draw_select[np.flatnonzero(np.r_[True, word[1:] != word[:-1]])][word] < self.probability
        else:
            selected = draw_select < self.probability
        selected &= ~self._special[np.minimum(ids_np, len(self._special) - 1)]  # the last entry is False
        return rng, ids_np, selected

    def block(self, ids: Any, word_start: Any, seed: int, epoch: int, index: int):
        """(inputs, labels) of one block; the same arguments always give the same masks."""
        rng, ids_np, selected = self._selected(ids, word_start, seed, epoch, index)
        length = len(ids_np)
        draw_kind = rng.random(length)
        random_tokens = rng.integers(0, self.vocab_size, length)
        labels = np.where(selected, ids_np, IGNORE)
        inputs = ids_np.copy()
        inputs[selected & (draw_kind < 0.8)] = self.mask_token_id
        swap = selected & (draw_kind >= 0.8) & (draw_kind < 0.9)
        inputs[swap] = random_tokens[swap]
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def batch(self, blocks: Any, indices, seed: int, epoch: int):
        """Inputs and labels of the blocks `indices`, stacked; blocks[i] is (ids, word starts) of block i."""
        pairs = []
        for i in map(int, indices):
            ids, starts = blocks[i]
            pairs.append(self.block(ids, starts, seed, epoch, i))
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: the same on every rank, and again after a resume."""
    return np.random.default_rng([seed, epoch + 1, 0x5EED]).permutation(n_blocks)


@functools.lru_cache(maxsize=1)
def _epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's block order, computed once per epoch in each process (it depends only on seed and epoch)."""
    return epoch_order(count, seed, epoch)


# ---------------------------------------------------------------- the batches of training steps


@dataclass(frozen=True)
class Plan:
    """How global batches are drawn and split: `batch_size` blocks per step in the epoch's order, dealt
    to `world` processes micro-batch by micro-batch (micro-batch m of rank r: rows (m * world + r) * mb ...)."""

    seed: int
    batch_size: int
    micro_batch_size: int
    steps_per_epoch: int
    world: int = 1
    rank: int = 0

    def rows(self) -> np.ndarray:
        """This process's positions in a global batch, its micro-batches one after the other."""
        mb = self.micro_batch_size
        firsts = [(m * self.world + self.rank) * mb for m in range(self.batch_size // (self.world * mb))]
        return np.concatenate([np.arange(first, first + mb) for first in firsts])


class StepBatches(torch.utils.data.Dataset):
    """Item i: the batch of step `first + i` for this process: (inputs, labels) of its rows, masked, and
    their number of masked tokens (the training step sums it over the ranks: every rank's loss is
    divided by the whole global batch's count)."""

    def __init__(self, blocks: Any, masker: Masker, plan: Plan, first: int, total: int):
        self.blocks, self.masker, self.plan = blocks, masker, plan
        self.first, self.total = first, total

    def __len__(self) -> int:
        return self.total - self.first

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        plan, masker = self.plan, self.masker
        epoch, position = divmod(self.first + index, plan.steps_per_epoch)
        order = _epoch_order(len(self.blocks), plan.seed, epoch)
        indices = order[position * plan.batch_size : (position + 1) * plan.batch_size]
        rows = plan.rows()
        inputs, labels = masker.batch(self.blocks, indices[rows], plan.seed, epoch)
        return inputs, labels, int((labels != IGNORE).sum())


@contextlib.contextmanager
def step_loader(batches: StepBatches, workers: int, pin_memory: bool) -> Iterator[Iterator]:
    """The step batches in order, built by `workers` processes ahead of training (0: here, on demand).

    The workers are stopped when the block ends, however it ends (a stop signal, a diverged loss)."""
    if workers:
        # The fast tokenizer's threads ran in this process; forked workers never tokenize.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # an item is a whole step's batch already
        num_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
        pin_memory=pin_memory,
        # Its own generator: a loader draws a seed for its workers when iterated, and a draw from the
        # global one would shift the dropout of a resumed run (the batches never use torch's RNG).
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # the multi-process iterator's own cleanup
        if shutdown is not None:
            shutdown()
