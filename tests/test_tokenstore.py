"""The token store (medclf/tokenstore.py) and the step batches built from it (medclf/masking.py):
the same stream and the same batches whatever the shard size and the number of ranks; a killed
tokenization resumes without redoing verified shards; a damaged shard is named and rebuilt."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from medclf import cli, manifest, tokenstore
from medclf.errors import MedclfError
from medclf.masking import IGNORE, Masker, Plan, StepBatches, step_loader
from medclf.storage import PAUSE_AFTER_ENV
from tests.helpers import Ranks, as_ranks, kill_when_seen, make_mlm_run


@pytest.fixture(scope="module")
def notes(mtsamples) -> list[str]:
    return list(dict.fromkeys(pd.read_csv(mtsamples)["transcription"].dropna()))[:12]  # distinct notes


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def write_csv(path: Path, texts: list[str], column: str = "transcription") -> str:
    pd.DataFrame({"id": range(len(texts)), column: texts}).to_csv(path, index=False)
    return str(path)


def build_as(world: int, urls: list[str], tokenizer, cache: Path, shard_rows: int) -> tokenstore.Built:
    """The store built by `world` ranks at once (threads, each with its own tokenizer); the main rank's view."""

    def rank(ranks: Ranks) -> tokenstore.Built:
        return tokenstore.build(urls, "transcription", copy.deepcopy(tokenizer), str(cache), shard_rows, ranks)

    return as_ranks(world, rank)


def whole(stream: tokenstore.Stream) -> tuple[np.ndarray, np.ndarray]:
    return stream.tokens(0, len(stream))


def store_files(built: tokenstore.Built) -> dict[str, str]:
    return {name: e["sha256"] for name, e in manifest.read(built.url, "token store")["files"].items()}


# ---------------------------------------------------------------- the stream


def test_the_stream_is_the_distinct_texts_in_order_whatever_the_shard_size_and_ranks(notes, tokenizer, tmp_path):
    # Two files; copies of notes inside a file and across both (MTSamples lists many notes twice).
    first = write_csv(tmp_path / "a.csv", [notes[0], notes[1], notes[0], notes[2], notes[3]])
    second = write_csv(tmp_path / "b.csv", [notes[1], notes[4], notes[5], notes[4], notes[6], notes[7], notes[8]])
    expected_ids, expected_starts = tokenstore.tokenize(notes[:9], tokenizer)
    assert expected_ids.dtype == np.uint16  # a vocabulary under 65,536 ids
    stores = {}
    for shard_rows, world in [(100, 1), (2, 1), (2, 2), (2, 3), (3, 2)]:
        built = build_as(world, [first, second], tokenizer, tmp_path / f"cache-{shard_rows}-{world}", shard_rows)
        ids, starts = whole(built.stream)
        assert np.array_equal(ids, expected_ids) and np.array_equal(starts, expected_starts), (shard_rows, world)
        stores[shard_rows, world] = store_files(built)
    assert stores[2, 1] == stores[2, 2] == stores[2, 3]  # the same shard files, byte for byte, whatever the ranks
    assert len(stores[2, 1]) == 2 * (3 + 4)  # 3 shards of a.csv, 4 of b.csv: ids and starts each
    # One distinct text: [CLS] at a word start, word pieces after the first of a word are not.
    assert expected_ids[0] == tokenizer.cls_token_id and expected_starts[0]
    pieces = tokenizer(notes[0], add_special_tokens=False)
    continued = [j + 1 for j, w in enumerate(pieces.word_ids()) if j and w == pieces.word_ids()[j - 1]]
    assert continued and not expected_starts[continued].any()


def test_the_store_key_does_not_change_when_the_tokenizer_has_been_used(notes, tiny_bert):
    # A process with no shard of its own never calls the tokenizer; the key must still be the same.
    fresh = AutoTokenizer.from_pretrained(tiny_bert)
    fresh.backend_tokenizer.enable_truncation(128)  # as a tokenizer.json with truncation loads (MiniLM's)
    key = tokenstore.tokenizer_fingerprint(fresh)
    tokenstore.tokenize(notes[:2], fresh)  # resets truncation and padding
    assert tokenstore.tokenizer_fingerprint(fresh) == key
    assert key != tokenstore.tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_bert, do_lower_case=False))


def test_blocks_span_shards_and_the_tail_is_dropped(notes, tokenizer, tmp_path):
    built = build_as(1, [write_csv(tmp_path / "a.csv", notes[:5])], tokenizer, tmp_path / "cache", 1)
    ids, starts = whole(built.stream)
    blocks = tokenstore.StreamBlocks(built.stream, 100)
    assert built.stream.shards == 5 and len(blocks) == len(ids) // 100
    for i in range(len(blocks)):
        assert np.array_equal(blocks[i][0], ids[i * 100 : (i + 1) * 100])
        assert np.array_equal(blocks[i][1], starts[i * 100 : (i + 1) * 100])
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_an_empty_text_is_refused_by_row_and_nothing_is_written(notes, tokenizer, tmp_path):
    csv = write_csv(tmp_path / "a.csv", [notes[0], notes[1], notes[2], notes[3], "  ", notes[4]])
    with pytest.raises(MedclfError, match=r"a\.csv: row 5: empty transcription"):
        build_as(2, [csv], tokenizer, tmp_path / "cache", 2)
    assert not (tmp_path / "cache").exists()
    other = write_csv(tmp_path / "b.csv", notes[:2], column="text")
    with pytest.raises(
        MedclfError,
        match=r"b\.csv: missing column\(s\) transcription \(dataset\.text_column\); columns present: id, text",
    ):
        build_as(1, [other], tokenizer, tmp_path / "cache", 2)


# ---------------------------------------------------------------- damage and kills


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "remove"])
def test_a_damaged_shard_is_refused_by_name_and_rebuilt_alone(damage, notes, tokenizer, tmp_path, caplog):
    csv = write_csv(tmp_path / "a.csv", notes[:6])
    first = build_as(1, [csv], tokenizer, tmp_path / "cache", 2)
    expected = whole(first.stream)
    folder = Path(first.url)
    victim = folder / "shard-000001.ids.npy"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*") if not p.name.startswith("shard-000001")}
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[:-50]))
    elif damage == "flip a byte":
        data[-3] ^= 0x01  # in the ids, which np.load never checks
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    with caplog.at_level(logging.INFO, logger="medclf"):
        again = build_as(1, [csv], tokenizer, tmp_path / "cache", 2)
    reason = "missing" if damage == "remove" else "SHA-256 differs from its entry"
    assert f"{victim}: {reason}" in caplog.text and "rebuilding shard 1" in caplog.text
    assert again.tokens_built > 0 and "shard 0 (" not in caplog.text and "shard 2 (" not in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(whole(again.stream), expected, strict=True))
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*") if p.name in kept} == kept
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medclf"):
        assert build_as(2, [csv], tokenizer, tmp_path / "cache", 2).tokens_built == 0
    assert "rebuilding" not in caplog.text


def test_a_damaged_store_manifest_is_written_again_and_no_shard_redone(notes, tokenizer, tmp_path, caplog):
    csv = write_csv(tmp_path / "a.csv", notes[:4])
    first = build_as(2, [csv], tokenizer, tmp_path / "cache", 2)
    listing = Path(first.url) / manifest.MANIFEST
    good = listing.read_bytes()
    listing.write_bytes(good[:-20])
    with caplog.at_level(logging.INFO, logger="medclf"):
        again = build_as(2, [csv], tokenizer, tmp_path / "cache", 2)
    assert f"{listing}: not valid JSON" in caplog.text and "writing it again" in caplog.text
    assert again.tokens_built == 0 and "shard 0 (" not in caplog.text and listing.read_bytes() == good


@pytest.mark.slow
def test_killed_while_tokenizing_resumes_without_redoing_verified_shards(tiny_bert, mtsamples, tmp_path, caplog):
    out = make_mlm_run(tmp_path / "run", mtsamples, train_rows=12)
    args = ["tokenize", f"out={out}", f"model={tiny_bert}", "shard_rows=2"]
    # Killed (SIGKILL) right after shard 2's entry is written: shards 0-2 are complete, 3-5 are not.
    seen = kill_when_seen([sys.executable, "-m", "medclf", *args], {PAUSE_AFTER_ENV: "shard-000002.json"}, "pausing")
    assert "shard 1 (" in seen and "shard 2 (" not in seen  # the pause comes before shard 2's log line
    (folder,) = [p for p in (out / "cache").iterdir() if (p / "shard-000002.json").exists()]
    assert not (folder / manifest.MANIFEST).exists()
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-00000[012].*")}
    assert len(done) == 9
    with caplog.at_level(logging.INFO, logger="medclf"):
        cli.main(args)
    built = [line for line in caplog.text.splitlines() if "): " in line and "shard " in line]
    assert [line.split("shard ")[1].split(" ")[0] for line in built] == ["3", "4", "5", "0"]  # then validation's
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-00000[012].*")} == done
    # The resumed store is the one an uninterrupted run writes.
    fresh = make_mlm_run(tmp_path / "fresh", mtsamples, train_rows=12)
    cli.main(["tokenize", f"out={fresh}", f"model={tiny_bert}", "shard_rows=2"])
    assert (folder / manifest.MANIFEST).read_bytes() == (fresh / "cache" / folder.name / manifest.MANIFEST).read_bytes()


def test_a_remote_store_is_read_from_a_verified_local_copy(notes, tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(tokenstore.LOCAL_CACHE_ENV, str(tmp_path / "local"))
    csv = write_csv(tmp_path / "a.csv", notes[:4])
    remote = tokenstore.build([csv], "transcription", tokenizer, "memory://tokens-test/cache", 2, Ranks())
    local = build_as(1, [csv], tokenizer, tmp_path / "cache", 2)
    assert all(np.array_equal(a, b) for a, b in zip(whole(remote.stream), whole(local.stream), strict=True))
    copy = Path(remote.stream.folder) / "shard-000000.ids.npy"
    assert copy.is_file() and str(tmp_path / "local") in str(copy)
    copy.write_bytes(copy.read_bytes()[:-10])  # a damaged local copy is fetched again
    again = tokenstore.open_stream(remote.url)
    assert all(np.array_equal(a, b) for a, b in zip(whole(again), whole(local.stream), strict=True))


# ---------------------------------------------------------------- step batches


@pytest.fixture(scope="module")
def blocks(notes, tokenizer, tmp_path_factory) -> tokenstore.StreamBlocks:
    folder = tmp_path_factory.mktemp("store")
    built = build_as(1, [write_csv(folder / "a.csv", notes)], tokenizer, folder / "cache", 3)
    return tokenstore.StreamBlocks(built.stream, 32)


def test_each_rank_builds_its_rows_of_the_same_global_batch(blocks, tokenizer):
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids)
    steps_per_epoch = len(blocks) // 8
    one = StepBatches(blocks, masker, Plan(7, 8, 2, steps_per_epoch), 0, 2 * steps_per_epoch)
    ranks = [StepBatches(blocks, masker, Plan(7, 8, 2, steps_per_epoch, 2, r), 0, 2 * steps_per_epoch) for r in (0, 1)]
    assert steps_per_epoch >= 2
    for step in (0, 1, steps_per_epoch + 1):  # the second epoch has its own order and masks
        inputs, labels, masked = one[step]
        assert masked == int((labels != IGNORE).sum()) > 0
        parts = [r[step] for r in ranks]
        assert parts[0][2] + parts[1][2] == masked  # each rank counts its own rows; the step sums them
        for part in parts:
            assert part[2] == int((part[1] != IGNORE).sum())
        for micro in range(2):  # micro-batch m of rank r holds global rows (m * 2 + r) * 2 ...
            for rank in range(2):
                rows = slice((micro * 2 + rank) * 2, (micro * 2 + rank + 1) * 2)
                assert torch.equal(parts[rank][0][micro * 2 : micro * 2 + 2], inputs[rows])
                assert torch.equal(parts[rank][1][micro * 2 : micro * 2 + 2], labels[rows])
    assert not torch.equal(one[0][1], one[steps_per_epoch][1])


def test_workers_prepare_the_same_batches_in_order_from_any_step(blocks, tokenizer):
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, whole_word=True)
    plan = Plan(3, 4, 2, len(blocks) // 4)
    total = 2 * plan.steps_per_epoch
    with step_loader(StepBatches(blocks, masker, plan, 0, total), 0, False) as batches:
        here = list(batches)
    with step_loader(StepBatches(blocks, masker, plan, 3, total), 2, False) as batches:
        resumed = list(batches)  # a run resumed at step 3, its batches built by two worker processes
    assert len(here) == total and len(resumed) == total - 3
    for a, b in zip(here[3:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
