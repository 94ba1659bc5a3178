"""Masked-LM batches: texts -> token stream (tokenized once, cached) -> full blocks -> masks.

Masks are a pure function of (seed, epoch, block index): every rank can build any block's
masks without talking to the others, a resumed run rebuilds exactly the masks it would have
seen, and the evaluation masks (epoch -1, `eval_seed`) are the same for every run and process
count.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from medclf import manifest, storage

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that carry no loss (the convention of torch's cross_entropy)


# ---------------------------------------------------------------- token stream, cached


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes two tokenizers produce the same ids: the full backend definition, or the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def fingerprint(texts: list[str], tokenizer) -> str:
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:24]


def token_stream(texts: list[str], tokenizer, cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts as one stream of ids (each text wrapped in [CLS] ... [SEP]) and a word-start flag per token.

    Cached under `cache_dir` by a fingerprint of the texts and the tokenizer, sealed with the SHA-256
    of its tensors (a damaged cache is rebuilt with a warning); call it on the main
    process first (`accelerator.main_process_first()`), so the others read what it wrote.
    """
    url = storage.join(cache_dir, f"mlm-tokens-{fingerprint(texts, tokenizer)}.safetensors")
    cached = manifest.read_sealed(url, "token cache")  # None: absent, or damaged (then rebuilt)
    if cached is not None and {"input_ids", "word_start"} <= cached.keys():
        return cached["input_ids"], cached["word_start"]
    ids, starts = [], []
    for begin in range(0, len(texts), 256):
        enc = tokenizer(texts[begin : begin + 256], add_special_tokens=False, verbose=False)
        for i, piece_ids in enumerate(enc["input_ids"]):
            word_ids = enc.word_ids(i) if enc.is_fast else [None] * len(piece_ids)
            first = [w is None or j == 0 or w != word_ids[j - 1] for j, w in enumerate(word_ids)]
            ids += [tokenizer.cls_token_id, *piece_ids, tokenizer.sep_token_id]
            starts += [True, *first, True]
    stream = torch.tensor(ids, dtype=torch.int32), torch.tensor(starts, dtype=torch.bool)
    storage.write_bytes(url, manifest.sealed({"input_ids": stream[0], "word_start": stream[1]}))
    log.info("tokenized %d texts into %d tokens; cached at %s", len(texts), len(ids), url)
    return stream


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

    def block(self, ids: torch.Tensor, word_start: torch.Tensor, seed: int, epoch: int, index: int):
        """(inputs, labels) of one block; the same arguments always give the same masks."""
        rng = np.random.default_rng([seed, epoch + 1, index])
        length = len(ids)
        draw_select, draw_kind = rng.random(length), rng.random(length)
        random_tokens = rng.integers(0, self.vocab_size, length)
        ids_np = ids.numpy().astype(np.int64)
        if self.whole_word:
            # All pieces of a word share the draw of its first piece.
            word = np.cumsum(word_start.numpy()) - 1
            word = word - word.min()
            selected = draw_select[np.flatnonzero(np.r_[True, word[1:] != word[:-1]])][word] < self.probability
        else:
            selected = draw_select < self.probability
        selected &= ~np.isin(ids_np, self.special_ids)
        labels = np.where(selected, ids_np, IGNORE)
        inputs = ids_np.copy()
        inputs[selected & (draw_kind < 0.8)] = self.mask_token_id
        swap = selected & (draw_kind >= 0.8) & (draw_kind < 0.9)
        inputs[swap] = random_tokens[swap]
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def batch(self, blocks: torch.Tensor, starts: torch.Tensor, indices, seed: int, epoch: int):
        """Inputs and labels of the blocks `indices` (rows of `blocks`), stacked."""
        pairs = [self.block(blocks[i], starts[i], seed, epoch, int(i)) for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def epoch_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled block order of one epoch: the same on every rank, and again after a resume."""
    return np.random.default_rng([seed, epoch + 1, 0x5EED]).permutation(n_blocks)
