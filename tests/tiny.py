"""A tiny BERT for fast tests: WordPiece vocabulary trained on the notes, 2 layers, hidden 32."""

from __future__ import annotations

import pathlib

import pandas as pd


def make_tiny_bert(folder: pathlib.Path, csv: pathlib.Path, vocab_size: int = 1000, seed: int = 0) -> pathlib.Path:
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    texts = pd.read_csv(csv)["transcription"].dropna().tolist()[:1500]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2)
    wordpiece.save_model(str(folder))
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    return folder
