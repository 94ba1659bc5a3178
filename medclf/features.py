"""Note vectors from an encoder: each distinct text encoded once, length-sorted, sharded, cached.

A frozen encoder's features are a deterministic function of the text, so the head job encodes
each distinct text once (eval mode, batches of similar length padded only to their longest
member, the work dealt across processes and gathered) and keeps the result under

    <out>/features/<key>.safetensors

where the key covers the encoder's content fingerprint, the texts and `key_settings`
(precision, the windows and both poolings); the file is sealed with its tensors' SHA-256 and
rebuilt if damaged: another head, seed or the compare job on the same data reads the file
instead of encoding. Evaluate and predict use the same `encode`, so every path sees the same
vectors.

A note longer than one window is encoded as several (classifier.Windows); the windows of all
notes are batched together, longest first, and each note's window vectors are pooled back into
one vector (mean or max) in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Optional, Sequence, Union, cast

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from medclf import data, layout, manifest, storage
from medclf.classifier import Classifier, Windows, pool_windows, special_tokens
from medclf.config import HeadSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

TOKENIZE_SLICE = 256  # notes per tokenizer call


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Positions grouped longest first, so each batch pads to a length close to its members'."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(ids: list[list[int]], pad_id: int, pad_to: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded to the longest sequence, or to `pad_to`."""
    width = pad_to or max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return input_ids, mask


def windows_of(settings: HeadSpec) -> Windows:
    return Windows(settings.max_length, settings.stride, settings.windows)


def tokenize_windows(tokenizer, texts: Sequence[str], windows: Windows) -> list[list[list[int]]]:
    """Each text's windows of token ids, tokenized a slice at a time (ids only: a fast tokenizer
    holds every token's offsets until its output is freed, ~90 MB per 1,000 notes)."""
    from transformers.utils import logging as hf_logging

    specials = special_tokens(tokenizer)
    needed = windows.tokens_needed(specials)
    limit = {"truncation": True, "max_length": needed} if needed is not None else {"truncation": False}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "longer than the model's maximum": the windows take care of that
    try:
        return [
            windows.split(tokens, specials)
            for begin in range(0, len(texts), TOKENIZE_SLICE)
            for tokens in tokenizer(list(texts[begin : begin + TOKENIZE_SLICE]), add_special_tokens=False, **limit)[
                "input_ids"
            ]
        ]
    finally:
        hf_logging.set_verbosity(verbosity)


@torch.inference_mode()
def encode(
    model: Classifier,
    tokenizer,
    texts: Sequence[str],
    windows: Union[Windows, int],
    batch_size: int,
    accelerator: Accelerator,
    sort_by_length: bool = True,
    pad_to: Optional[int] = None,
) -> torch.Tensor:
    """Pooled last-layer vectors [len(texts), hidden] (float32, CPU, the same on every rank).

    Copies of a text are encoded once. Distinct texts are ordered by length and dealt round-robin
    to the ranks, so every rank gets a similar share of long and short notes; the results are
    gathered with their positions and put back in input order. `windows` as a number is
    max_length with one window per note (truncation). `sort_by_length=False` and `pad_to`
    reproduce the original's fixed padding (for the benchmarks).
    """
    windows = windows if isinstance(windows, Windows) else Windows(windows, cap=1)
    codes, distinct = pd.factorize(pd.Series(list(texts), dtype=object))
    rank, world = accelerator.process_index, accelerator.num_processes
    by_chars = np.argsort(-distinct.str.len().to_numpy(), kind="stable") if sort_by_length else np.arange(len(distinct))
    mine = by_chars[rank::world]
    per_note = tokenize_windows(tokenizer, list(distinct[mine]), windows)
    out = _encode_windows(model, tokenizer, per_note, batch_size, accelerator, sort_by_length, pad_to)

    # -- gather: equal-length pieces (padded with position -1), then back to input order
    hidden = out.shape[1]
    share = -(-len(distinct) // world)
    positions = torch.full((share,), -1, dtype=torch.long)
    positions[: len(mine)] = torch.as_tensor(mine, dtype=torch.long)
    vectors = torch.zeros((share, hidden), dtype=torch.float32)
    vectors[: len(mine)] = out
    if world > 1:
        positions = accelerator.gather(positions.to(accelerator.device)).cpu()
        vectors = accelerator.gather(vectors.to(accelerator.device)).cpu()
    everything = torch.zeros((len(distinct), hidden), dtype=torch.float32)
    found = positions >= 0
    everything[positions[found]] = vectors[found]
    return everything[torch.as_tensor(codes, dtype=torch.long)]


def _encode_windows(
    model: Classifier,
    tokenizer,
    per_note: list[list[list[int]]],
    batch_size: int,
    accelerator: Accelerator,
    sort_by_length: bool,
    pad_to: Optional[int],
) -> torch.Tensor:
    """One vector per note [notes, hidden]: all windows batched (longest first), then pooled per note."""
    flat = [w for note in per_note for w in note]
    batches = (
        length_sorted_batches([len(x) for x in flat], batch_size)
        if sort_by_length
        else [np.arange(i, min(i + batch_size, len(flat))) for i in range(0, len(flat), batch_size)]
    )
    # -- encode window by window batch (eval mode: no dropout, no gradients)
    model.to(accelerator.device).eval()
    hidden = cast(torch.nn.Linear, model.head.layers[0]).in_features
    started, tokens = time.perf_counter(), 0
    out = torch.zeros((len(flat), hidden), dtype=torch.float32)
    for batch in batches:
        input_ids, mask = pad([flat[i] for i in batch], tokenizer.pad_token_id, pad_to)
        with accelerator.autocast():
            vectors = model.features(input_ids.to(accelerator.device), mask.to(accelerator.device))
        out[torch.as_tensor(batch)] = vectors.float().cpu()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - started
    log.info(
        "encoded %d notes as %d windows in %.1f s on process %d of %d: %.0f tokens/s",
        len(per_note),
        len(flat),
        seconds,
        accelerator.process_index,
        accelerator.num_processes,
        tokens / max(seconds, 1e-9),
    )
    if not per_note:
        return torch.zeros((0, hidden), dtype=torch.float32)
    return pool_windows(out, [len(note) for note in per_note], model.window_pooling)


CACHE_FORMAT = "windows/1"  # bump when the way vectors are computed changes


def key_settings(model: Classifier, windows: Windows, accelerator: Accelerator) -> dict:
    """Every setting besides the encoder and the texts that changes the vectors: the one place a
    new one is added, so that the cache key always covers it."""
    dtype = next(model.encoder.parameters()).dtype
    return {
        "format": CACHE_FORMAT,
        "dtype": str(dtype).removeprefix("torch."),
        "mixed_precision": str(accelerator.mixed_precision),
        "max_length": windows.max_length,
        "stride": windows.stride,
        "windows": windows.cap,
        "pooling": model.pooling,
        "window_pooling": model.window_pooling,
    }


def cache_key(encoder_fingerprint: str, texts: Sequence[str], settings: dict) -> str:
    digest = hashlib.sha256(f"{encoder_fingerprint}\0{json.dumps(settings, sort_keys=True)}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:24]


def cached_encode(
    model: Classifier,
    tokenizer,
    texts: Sequence[str],
    *,
    windows: Windows,
    batch_size: int,
    accelerator: Accelerator,
    cache_dir: str,
    encoder_fingerprint: str,
    source: str,
) -> torch.Tensor:
    """`encode`, read from `cache_dir` when this encoder, data and `key_settings` were seen before.

    The file is sealed with the SHA-256 of its tensors: a damaged one is rebuilt with a warning."""
    settings = key_settings(model, windows, accelerator)
    url = storage.join(cache_dir, f"{cache_key(encoder_fingerprint, texts, settings)}.safetensors")
    cached = manifest.read_sealed(url, "feature cache")  # None: absent, or damaged (then rebuilt)
    if cached is not None:
        vectors = cached.get("features")
        if vectors is None or vectors.shape[0] != len(texts):
            raise MedclfError(f"{url}: cached features do not match {source} ({len(texts)} rows); delete the file")
        log.info("features of %s read from %s", source, url)
        return vectors
    vectors = encode(model, tokenizer, texts, windows, batch_size, accelerator)
    if accelerator.is_main_process:
        metadata = {"source": source, "encoder_fingerprint": encoder_fingerprint, "rows": str(len(texts))}
        metadata |= {k: str(v) for k, v in settings.items()}
        storage.write_bytes(url, manifest.sealed({"features": vectors.contiguous()}, metadata))
        log.info("features of %s cached at %s", source, url)
    accelerator.wait_for_everyone()
    return vectors


def cached_splits(
    model: Classifier,
    tokenizer,
    splits: Sequence[tuple[str, pd.DataFrame]],
    settings: HeadSpec,
    out: str,
    accelerator: Accelerator,
    encoder_fingerprint: str,
) -> list[torch.Tensor]:
    """`cached_encode` of each (url, frame)'s texts with a head's settings, cached in the run `out`."""
    return [
        cached_encode(
            model,
            tokenizer,
            df[data.TEXT].tolist(),
            windows=windows_of(settings),
            batch_size=settings.encode_batch_size,
            accelerator=accelerator,
            cache_dir=layout.Run(out).features,
            encoder_fingerprint=encoder_fingerprint,
            source=url,
        )
        for url, df in splits
    ]
