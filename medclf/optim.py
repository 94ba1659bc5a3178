"""The optimizer and schedule the training loops share: AdamW without weight decay on biases and
LayerNorm weights, and linear warm-up then linear decay to 0 (mlm, and the head when fine-tuning)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, **settings) -> list[dict]:
    """Two AdamW parameter groups: weight matrices decay, the 1-d parameters (biases, LayerNorm
    weights) do not. `settings` (e.g. lr) apply to both groups."""
    trainable = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay, **settings},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, **settings},
    ]


def adamw(groups: list, lr: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: ~10× faster on the dense 30k-word embedding update on CPU."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int) -> LambdaLR:
    """Each group's lr rises linearly from 0 over the first `warmup_ratio` of `total_steps`, then
    falls linearly to 0 after the last step (transformers' linear schedule)."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)
