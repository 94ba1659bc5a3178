"""Helpers the test modules share: small run folders cut from the real data, a tiny BERT, a tiny
classifier, running the CLI in-process, and comparing folders and weights. Test modules import
from here, never from each other."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
from typing import Any, Callable, Optional

import pandas as pd
import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent

# A masked-LM run of a few steps on a tiny BERT (bare keys belong to the mlm section).
TINY_MLM_ARGS = [
    "max_length=64",
    "batch_size=8",
    "micro_batch_size=4",
    "log_every=1",
    "lr=1e-3",
    "eval_blocks=8",
    "keep_last=10",
]


@dataclasses.dataclass
class Ranks:
    """What the token store asks of an accelerator: rank `process_index` of `num_processes`, each
    rank a thread of this process meeting the others at `barrier` (none: a single rank)."""

    process_index: int = 0
    num_processes: int = 1
    barrier: Optional[threading.Barrier] = None

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        if self.barrier is not None:
            self.barrier.wait(timeout=120)


def as_ranks(world: int, job: Callable[[Ranks], Any]) -> Any:
    """`job` run by `world` ranks at once (threads meeting at a barrier); returns the main rank's result,
    or raises the first error a rank raised."""
    barrier = threading.Barrier(world)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def rank(index: int) -> None:
        try:
            results[index] = job(Ranks(index, world, barrier))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)
            barrier.abort()  # the other ranks stop waiting

    threads = [threading.Thread(target=rank, args=(index,)) for index in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))  # the cause first
    if errors:
        raise errors[0]
    return results[0]


# ---------------------------------------------------------------- run folders


def make_small_run(
    out: pathlib.Path, prepared: pathlib.Path, train_notes: int = 40, validation_notes: int = 16
) -> pathlib.Path:
    """<out>/prepare/ with the first N distinct notes of each split (all their copies, so some texts repeat)."""
    (out / "prepare").mkdir(parents=True, exist_ok=True)
    for name, notes in (("train.csv", train_notes), ("validation.csv", validation_notes)):
        df = pd.read_csv(prepared / "prepare" / name, dtype=str, keep_default_na=False)
        keep = df["text_id"].drop_duplicates().iloc[:notes]
        df[df["text_id"].isin(keep)].to_csv(out / "prepare" / name, index=False)
    shutil.copy(prepared / "prepare" / "labels.json", out / "prepare" / "labels.json")
    return out


def make_mlm_run(folder: pathlib.Path, mtsamples: pathlib.Path, train_rows: int = 4, validation_rows: int = 2):
    """A run folder whose prepare/ holds a few real notes (text only): an epoch is a handful of steps."""
    notes = pd.read_csv(mtsamples).dropna(subset=["transcription"])
    (folder / "prepare").mkdir(parents=True)
    notes.iloc[:train_rows][["transcription"]].to_csv(folder / "prepare" / "train.csv", index=False)
    notes.iloc[100 : 100 + validation_rows][["transcription"]].to_csv(
        folder / "prepare" / "validation.csv", index=False
    )
    return folder


def head_spec(out: pathlib.Path, encoder: pathlib.Path, *overrides: str):
    from medclf import config

    return config.load("head", None, [f"out={out}", f"mlm.model={encoder}", "head.max_length=64", *overrides])


def mlm_spec(out, model, *extra):
    from medclf import config

    return config.load("mlm", None, [f"out={out}", f"model={model}", *TINY_MLM_ARGS, *extra])


# ---------------------------------------------------------------- models


def make_tiny_bert(folder: pathlib.Path, csv: pathlib.Path, vocab_size: int = 1000, seed: int = 0) -> pathlib.Path:
    """A tiny BERT for fast tests: WordPiece vocabulary trained on the notes, 2 layers, hidden 32."""
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


def make_tiny_distilbert(folder: pathlib.Path, tiny_bert: pathlib.Path) -> pathlib.Path:
    """A tiny DistilBertForMaskedLM on the tiny BERT's vocabulary: its head (`vocab_projector`) is not one
    MaskedLM knows, so the job takes the full-projection loss path."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, folder / name)
    torch.manual_seed(0)
    vocab = len((tiny_bert / "vocab.txt").read_text(encoding="utf-8").splitlines())
    config = DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128
    )
    DistilBertForMaskedLM(config).save_pretrained(folder)
    return folder


def make_classifier(folder: pathlib.Path, encoder: pathlib.Path, classes: list[str], max_length: int = 32, **windows):
    """A frozen tiny classifier (untrained head) saved as the head job saves one (`windows`: its
    stride, windows and window_pooling, else one truncated window)."""
    from medclf import classifier, runtime

    _, _, where = classifier.load_encoder(str(encoder))
    runtime.seed_everything(0)
    head = classifier.Head(32, len(classes))
    info = classifier.ClassifierInfo(
        classes=classes,
        encoder=str(encoder),
        pooling="cls",
        max_length=max_length,
        encoder_fingerprint=classifier.fingerprint(where),
        hidden_size=32,
        dropout=0.2,
        frozen=True,
        **windows,
    )
    classifier.save(str(folder), head, info)
    return folder


# ---------------------------------------------------------------- running and comparing


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, the error line) of `medclf ARGV` run in this process."""
    from medclf import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, f"expected one error line, got: {err[-2000:]!r}"
    return ended.value.code, errors[0]


def tree(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` (hidden temporaries included) with the SHA-256 of its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def weights(out: pathlib.Path) -> dict:
    """The adapted model's tensors of a finished masked-LM run."""
    from safetensors.torch import load_file

    return load_file(str(out / "mlm" / "model" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def publish_killed_before_the_manifest(source: pathlib.Path, url: str, endpoint: str | None = None) -> None:
    """Run manifest.publish_dir(source, url) in its own process and SIGKILL it at the test pause
    before the manifest (`endpoint`: the S3 server's, credentials from the environment)."""
    from medclf import manifest

    code = "from medclf import manifest, storage, config\n"
    if endpoint:
        code += f"storage.configure(config.StorageSpec(endpoint_url={endpoint!r}))\n"
    code += f"manifest.publish_dir({str(source)!r}, {url!r})"
    kill_when_seen([sys.executable, "-c", code], {manifest.PAUSE_ENV: "120"}, "pausing before the manifest")


def kill_when_seen(command: list[str], env: dict, pattern: str) -> str:
    """Start `command` (this checkout first on the path, `env` added), SIGKILL it as soon as `pattern`
    shows in its output; returns the output, once checked that the pattern came and the kill hit."""
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    try:
        while pattern not in seen:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            seen += line
    finally:
        process.kill()  # SIGKILL: no handler runs, no file is closed
        seen += process.communicate(timeout=60)[0]
    assert pattern in seen and process.returncode == -9, seen[-3000:]
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
