"""The head job: the original head, features encoded once and cached, the classifier saved and loaded."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from medclf import classifier, features, head, runtime, training
from medclf.classifier import Classifier, Head
from medclf.errors import MedclfError
from tests.helpers import head_spec, make_small_run


def test_head_has_the_original_shape_and_parameter_count():
    h = Head(768, 6)
    kinds = [type(m).__name__ for m in h.layers]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [m.p for m in h.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2]
    assert sum(p.numel() for p in h.parameters()) == 1_185_798
    assert h(torch.zeros(3, 768)).shape == (3, 6)


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(classifier.pool(hidden, mask, "cls"), hidden[:, 0])
    mean = classifier.pool(hidden, mask, "mean")
    assert torch.allclose(mean[0], hidden[0, :2].mean(0)) and torch.allclose(mean[1], hidden[1].mean(0))


@pytest.fixture
def small(tmp_path, prepared):
    return make_small_run(tmp_path / "run", prepared)


def _count_encoded_rows(monkeypatch) -> list[int]:
    """Every row the encoder sees, through the head job's own encoder loading."""
    seen: list[int] = []
    load = head.load_encoder

    def counting(ref):
        encoder, tokenizer, where = load(ref)
        encoder.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        return encoder, tokenizer, where

    monkeypatch.setattr(head, "load_encoder", counting)
    return seen


@pytest.mark.slow
def test_features_are_computed_once_per_text_however_many_epochs(small, tiny_bert, tmp_path, monkeypatch):
    seen = _count_encoded_rows(monkeypatch)
    splits = [pd.read_csv(small / "prepare" / f) for f in ("train.csv", "validation.csv")]
    distinct, rows = sum(df["transcription"].nunique() for df in splits), sum(len(df) for df in splits)
    assert distinct < rows  # the data repeats texts, so "once per text" is a real claim

    head.run(head_spec(small, tiny_bert, "epochs=1"))
    assert sum(seen) == distinct

    other = tmp_path / "other"
    shutil.copytree(small / "prepare", other / "prepare")
    seen.clear()
    head.run(head_spec(other, tiny_bert, "epochs=5"))
    assert sum(seen) == distinct

    seen.clear()  # a second head on the same run reads the cached features
    head.run(head_spec(other, tiny_bert, "epochs=2", "name=again", "seed=7"))
    assert sum(seen) == 0
    assert len(list((other / "features").iterdir())) == 2
    metrics = json.loads((other / "head-again" / "metrics.json").read_text())
    assert metrics["seed"] == 7 and 0 <= metrics["accuracy"] <= 1


@pytest.mark.slow
def test_training_on_cached_features_equals_training_through_the_frozen_encoder(tiny_bert, prepared):
    df = pd.read_csv(prepared / "prepare" / "train.csv").iloc[:30]
    texts, y = df["transcription"].tolist(), torch.tensor(pd.factorize(df["medical_specialty"])[0])
    accelerator = runtime.make_accelerator()
    encoder, tokenizer, _ = classifier.load_encoder(str(tiny_bert))
    settings = dict(epochs=3, batch_size=8, lr=1e-2, seed=3)

    runtime.seed_everything(1)
    through = Classifier(encoder, Head(32, 6), "cls", frozen=True)
    start = {k: v.clone() for k, v in through.head.state_dict().items()}
    batch = tokenizer(texts, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    training.fit(accelerator, through, TensorDataset(batch["input_ids"], batch["attention_mask"], y), **settings)

    runtime.seed_everything(1)
    cached = Classifier(encoder, Head(32, 6), "cls", frozen=True)
    vectors = features.encode(cached, tokenizer, texts, 64, 7, accelerator)
    training.fit(accelerator, cached.head, TensorDataset(vectors, y), **settings)

    with torch.no_grad():
        logits_through, logits_cached = through.head.eval()(vectors), cached.head.eval()(vectors)
        assert not torch.allclose(through.head.state_dict()["layers.0.weight"], start["layers.0.weight"])
        assert torch.allclose(logits_through, logits_cached, atol=1e-4)
        # and the encoder itself never changed
        assert torch.allclose(through(batch["input_ids"], batch["attention_mask"]), logits_through, atol=1e-4)


def test_classifier_round_trip_through_fsspec(tiny_bert):
    encoder, tokenizer, where = classifier.load_encoder(str(tiny_bert))
    runtime.seed_everything(0)
    model = Classifier(encoder, Head(32, 3, dropout=0.1), "mean", frozen=True).eval()
    info = classifier.ClassifierInfo(
        classes=["a", "b", "c"],
        encoder=str(tiny_bert),
        encoder_fingerprint=classifier.fingerprint(where),
        pooling="mean",
        max_length=64,
        hidden_size=32,
        dropout=0.1,
        frozen=True,
    )
    url = "memory://round-trip/model"
    classifier.save(url, model.head, info)
    loaded, loaded_tokenizer, loaded_info = classifier.load(url)
    assert loaded_info == info and not loaded.training
    ids = tokenizer(["chest pain and shortness of breath", "left knee"], padding=True, return_tensors="pt")
    with torch.no_grad():
        inputs = (ids["input_ids"], ids["attention_mask"])
        assert torch.equal(loaded(*inputs), model(*inputs))

    # A referenced encoder that changes afterwards must not silently feed the old head.
    # (saved again, manifest and all: an edited classifier.json alone is refused by the manifest check)
    classifier.save(url, model.head, dataclasses.replace(info, encoder_fingerprint="0" * 20))
    with pytest.raises(MedclfError, match="has changed since the head was trained"):
        classifier.load(url)


@pytest.mark.slow
def test_fine_tuning_copies_the_trained_encoder_into_the_classifier(small, tiny_bert):
    head.run(head_spec(small, tiny_bert, "epochs=1", "freeze=false", "name=tuned", "lr=1e-3"))
    model_dir = small / "head-tuned" / "model"
    info = json.loads((model_dir / "classifier.json").read_text())
    assert info["encoder"] == "encoder" and info["frozen"] is False
    loaded, _, _ = classifier.load(str(model_dir))
    original, _, _ = classifier.load_encoder(str(tiny_bert))
    name = "embeddings.word_embeddings.weight"
    assert not torch.equal(loaded.encoder.state_dict()[name], original.state_dict()[name])
    assert (small / "head-tuned" / "report.md").exists()


def test_bad_input_is_one_line_naming_the_key_file_or_row(small, tiny_bert):
    with pytest.raises(MedclfError, match=r"head.max_length=512 is above .* max_position_embeddings 128"):
        head.run(head_spec(small, tiny_bert, "head.max_length=512"))
    with pytest.raises(MedclfError, match=r"adapted: .*mlm/model has no model yet"):
        head.run(head_spec(small, tiny_bert, "encoder=adapted"))

    train = small / "prepare" / "train.csv"
    df = pd.read_csv(train, dtype=str, keep_default_na=False)
    df.loc[2, "medical_specialty"] = "Dermatology"
    df.to_csv(train, index=False)
    with pytest.raises(MedclfError, match=r"train.csv: row 3: label 'Dermatology' is not one of the classes"):
        head.run(head_spec(small, tiny_bert))
    df.drop(columns=["transcription"]).to_csv(train, index=False)
    with pytest.raises(MedclfError, match=r"train.csv: missing column\(s\) transcription"):
        head.run(head_spec(small, tiny_bert))
