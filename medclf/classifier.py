"""The classifier: a BERT-family encoder plus the original three-layer head, saved as safetensors + JSON.

    <model>/classifier.json   class names, encoder reference and fingerprint, pooling, windows, sizes
    <model>/head.safetensors  the head's weights
    <model>/encoder/          only for a fine-tuned classifier (freeze=false): its own encoder copy
    <model>/manifest.json     size and SHA-256 of every file above, written last: loading checks them

A frozen classifier references its encoder (the pretrained checkpoint or the mlm job's output)
instead of copying it; the fingerprint stored with it makes a later change of that encoder an
error at load time rather than silently wrong predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.checkpoint import checkpoint

from medclf import layout, manifest, models, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError

if TYPE_CHECKING:
    from transformers import PreTrainedModel  # for annotations; load_encoder imports transformers when it runs

FORMAT = "medclf-classifier/1"


class Head(nn.Module):
    """The original head: Linear(h,h)-ReLU-Dropout-Linear(h,h)-ReLU-Dropout-Linear(h,classes)."""

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


@dataclass(frozen=True)
class Windows:
    """How a note becomes token windows: `max_length` tokens each ([CLS] and [SEP] included), window
    starts `stride` content tokens apart (None: max_length - 2, no overlap), at most `cap` windows
    (None: all of them, the whole note; 1: the first max_length tokens, i.e. truncation)."""

    max_length: int
    stride: Optional[int] = None
    cap: Optional[int] = None

    def split(self, tokens: list[int], specials: tuple[list[int], list[int]]) -> list[list[int]]:
        """The windows of one note's content tokens (no special tokens), each wrapped in `specials`
        (special_tokens' answer: [CLS] before, [SEP] after for BERT)."""
        prefix, suffix = specials
        content = self.max_length - len(prefix) - len(suffix)
        stride = self.stride or content
        starts = [0]
        while starts[-1] + content < len(tokens) and (self.cap is None or len(starts) < self.cap):
            starts.append(starts[-1] + stride)
        return [prefix + tokens[s : s + content] + suffix for s in starts]

    def tokens_needed(self, specials: tuple[list[int], list[int]]) -> Optional[int]:
        """Content tokens the capped windows can reach (None: all), so tokenizing stops there."""
        if self.cap is None:
            return None
        content = self.max_length - len(specials[0]) - len(specials[1])
        return content + (self.cap - 1) * (self.stride or content)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence ([CLS] and [SEP] for BERT)."""
    wrapped = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(wrapped) - len(bare) + 1):
        if wrapped[i : i + len(bare)] == bare:
            return wrapped[:i], wrapped[i + len(bare) :]
    raise MedclfError(f"{type(tokenizer).__name__}: cannot tell its special tokens from the text's")


def pool_windows(vectors: torch.Tensor, counts: list[int], pooling: str) -> torch.Tensor:
    """Each note's vector from its windows' vectors (rows in note order, `counts` windows per note)."""
    if all(c == 1 for c in counts):
        return vectors
    parts = torch.split(vectors, counts)
    if pooling == "max":
        return torch.stack([p.max(0).values for p in parts])
    return torch.stack([p.mean(0) for p in parts])


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The note's vector from the last layer: its [CLS] token, or the mean over real (unpadded) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Classifier(nn.Module):
    """Encoder + head on token ids. A frozen encoder stays in eval mode even while the head trains.

    `pooling` makes a window's vector (its [CLS] or token mean), `window_pooling` a note's vector
    from its windows' vectors (mean or max). At most `max_windows` windows (None: all) go through
    the encoder at once; while training, each chunk's activations are recomputed in the backward
    pass instead of kept, so memory follows the chunk, not the batch's windows."""

    def __init__(
        self,
        encoder: PreTrainedModel,
        head: Head,
        pooling: str,
        frozen: bool,
        window_pooling: str = "mean",
        max_windows: Optional[int] = None,
    ):
        super().__init__()
        self.encoder, self.head, self.pooling, self.frozen = encoder, head, pooling, frozen
        self.window_pooling, self.max_windows = window_pooling, max_windows
        if frozen:
            self.encoder.requires_grad_(False)
        elif isinstance(getattr(encoder, "pooler", None), nn.Module):
            # A note's vector comes from the last layer (`pool`), never from the encoder's own pooler:
            # it would get no gradient, which DDP refuses on several processes. It stays as loaded.
            encoder.pooler.requires_grad_(False)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # deterministic features: no dropout inside the encoder
        return self

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.max_windows is None or len(input_ids) <= self.max_windows:
                return self._encode(input_ids, attention_mask)
            chunks = zip(input_ids.split(self.max_windows), attention_mask.split(self.max_windows), strict=True)
            if not torch.is_grad_enabled():
                return torch.cat([self._encode(ids, mask) for ids, mask in chunks])
            # gradients flow through every chunk; checkpoint replays dropout's random draws exactly
            return torch.cat([checkpoint(self._encode, ids, mask, use_reentrant=False) for ids, mask in chunks])

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling).float()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, counts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits per note; `counts` (windows per note, rows in note order) pools windows first, else
        every row is a note."""
        vectors = self.features(input_ids, attention_mask)
        if counts is not None:
            vectors = pool_windows(vectors, counts.tolist(), self.window_pooling)
        return self.head(vectors)


@dataclass
class ClassifierInfo:
    """What classifier.json holds: enough to rebuild the classifier and check its inputs."""

    classes: list[str]
    encoder: str  # a model reference, or "encoder" for the copy inside the model folder
    encoder_fingerprint: str
    pooling: str
    max_length: int
    hidden_size: int
    dropout: float
    frozen: bool
    format: str = FORMAT
    # Added with windows; a classifier.json written before them loads as one truncated window.
    stride: Optional[int] = None
    windows: Optional[int] = 1
    window_pooling: str = "mean"

    @property
    def windowing(self) -> Windows:
        return Windows(self.max_length, self.stride, self.windows)


# ---------------------------------------------------------------- encoders


def load_encoder(ref: str, where: Optional[str] = None) -> tuple[PreTrainedModel, object, str]:
    """(encoder, tokenizer, local folder or hub id) for any model reference models.resolve accepts
    (`where`: models.resolve's answer, when the caller has it already)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where = where or models.resolve(ref)
    # An mlm checkpoint carries an unused masked-LM head and no pooler; that is expected here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        encoder = AutoModel.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise MedclfError(f"{ref}: cannot load encoder ({' '.join(str(e).split())[:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return encoder, tokenizer, where


def encoder_reference(spec: RunSpec, encoder: str) -> str:
    """pretrained -> mlm.model; adapted -> <out>/mlm/model (which must exist); else the reference itself."""
    if encoder == "pretrained":
        return spec.mlm.model
    if encoder == "adapted":
        ref = layout.Run.of(spec).mlm_model
        if not manifest.exists(ref):  # written last: the model is complete
            raise MedclfError(f"head.encoder=adapted: {ref} has no model yet; run `medclf mlm` first")
        return ref
    return encoder


def fingerprint(where: str) -> str:
    """Content hash of a model folder; a hub id stands for itself.

    A folder published by medclf was verified against its manifest when it was resolved, so its
    fingerprint comes from the manifest's hashes; another folder's files are hashed here, once.
    """
    if not os.path.isdir(where):
        return "hub:" + where
    if manifest.exists(where):
        return manifest.fingerprint(manifest.read(where, "model"))
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(where)):
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, where).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(8 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:20]


def check_max_length(max_length: int, where: str, ref: str, key: str) -> None:
    positions = models.max_positions(where)
    if positions is not None and max_length > positions:
        raise MedclfError(f"{key}={max_length} is above {ref}'s max_position_embeddings {positions}")


# ---------------------------------------------------------------- save and load


def save(url: str, head: Head, info: ClassifierInfo, encoder: Optional[PreTrainedModel] = None, tokenizer=None) -> None:
    """Write the classifier folder; its manifest last, so a folder without one is an interrupted save."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "head.safetensors"), "wb") as f:
            f.write(save_safetensors(state, metadata={"format": FORMAT}))
        if encoder is not None:
            encoder.save_pretrained(os.path.join(tmp, "encoder"), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(tmp, "encoder"))
        with open(os.path.join(tmp, "classifier.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(asdict(info), indent=2) + "\n")
        manifest.publish_dir(tmp, url)


def read_info(url: str) -> ClassifierInfo:
    """classifier.json, once every file of the folder has matched its manifest (size and SHA-256)."""
    if not storage.exists(storage.join(url, "classifier.json")):
        raise MedclfError(f"{url}: not a medclf classifier folder (no classifier.json)")
    manifest.verify(url, what="classifier")
    raw = storage.read_json(storage.join(url, "classifier.json"))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise MedclfError(f"{storage.join(url, 'classifier.json')}: not a medclf classifier ({FORMAT})")
    try:
        return ClassifierInfo(**raw)
    except TypeError as e:
        raise MedclfError(f"{storage.join(url, 'classifier.json')}: {e}") from None


def load(url: str, info: Optional[ClassifierInfo] = None) -> tuple[Classifier, object, ClassifierInfo]:
    """(classifier in eval mode, tokenizer, info) from a folder written by `save` (`info`: read_info's
    result, when the caller has already read and verified the folder)."""
    info = info or read_info(url)
    ref = storage.join(url, "encoder") if info.encoder == "encoder" else info.encoder
    encoder, tokenizer, where = load_encoder(ref)
    check_max_length(info.max_length, where, ref, f"{storage.join(url, 'classifier.json')}: windows of max_length")
    if info.encoder != "encoder" and fingerprint(where) != info.encoder_fingerprint:
        raise MedclfError(
            f"{url}: its encoder {ref} has changed since the head was trained "
            f"(fingerprint {fingerprint(where)}, expected {info.encoder_fingerprint}); train the head again"
        )
    head = Head(info.hidden_size, len(info.classes), info.dropout)
    url_head = storage.join(url, "head.safetensors")
    try:
        head.load_state_dict(load_safetensors(storage.read_bytes(url_head)))
    except (RuntimeError, ValueError) as e:
        raise MedclfError(f"{url_head}: does not fit the head in classifier.json ({str(e).splitlines()[0]})") from None
    # inference only: never trains again
    model = Classifier(encoder, head, info.pooling, frozen=True, window_pooling=info.window_pooling)
    return model.eval(), tokenizer, info
