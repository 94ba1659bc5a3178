"""The feature cache (head, evaluate, compare) is verified on use: each file carries the SHA-256 of
its tensors, and a truncated or altered one is rebuilt with a warning, never used. The feature
cache's key covers every setting that changes the vectors. (The masked-LM token store's shards:
tests/test_tokenstore.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from medclf import classifier, features, runtime


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-50])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # in the tensor data, which safetensors itself never checks
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def notes(mtsamples) -> list[str]:
    return pd.read_csv(mtsamples)["transcription"].dropna().tolist()[:6]


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
def test_a_damaged_feature_cache_is_rebuilt_with_a_warning(damage, notes, tiny_bert, tmp_path, caplog, monkeypatch):
    encoder, tokenizer, where = classifier.load_encoder(str(tiny_bert))
    model = classifier.Classifier(encoder, classifier.Head(32, 3), "cls", frozen=True)
    accelerator = runtime.make_accelerator()
    calls = []
    encode = features.encode
    monkeypatch.setattr(features, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))

    def cached():
        return features.cached_encode(
            model,
            tokenizer,
            notes,
            windows=classifier.Windows(32),
            batch_size=4,
            accelerator=accelerator,
            cache_dir=str(tmp_path),
            encoder_fingerprint=classifier.fingerprint(where),
            source="notes",
        )

    first = cached()
    assert torch.equal(cached(), first) and len(calls) == 1
    (path,) = tmp_path.glob("*.safetensors")
    damage(path)
    with caplog.at_level(logging.WARNING, logger="medclf"):
        assert torch.equal(cached(), first)
    assert len(calls) == 2 and "damaged feature cache" in caplog.text
    assert torch.equal(cached(), first) and len(calls) == 2  # the rebuilt file is used


def test_the_feature_cache_key_covers_pooling_and_precision(tiny_bert):
    encoder, _, _ = classifier.load_encoder(str(tiny_bert))

    def settings(pooling="cls", max_length=64, mixed_precision="no", dtype=torch.float32):
        model = classifier.Classifier(encoder.to(dtype), classifier.Head(32, 3), pooling, frozen=True)
        return features.key_settings(
            model, classifier.Windows(max_length), SimpleNamespace(mixed_precision=mixed_precision)
        )

    cases = {
        "plain": settings(),
        "mean": settings(pooling="mean"),
        "longer": settings(max_length=128),
        "bf16 autocast": settings(mixed_precision="bf16"),
        "bf16 weights": settings(dtype=torch.bfloat16),
    }
    keys = {name: features.cache_key("enc", ["a note"], s) for name, s in cases.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert features.cache_key("enc", ["a note"], settings()) == keys["plain"]
