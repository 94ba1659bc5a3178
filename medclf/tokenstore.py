"""The token store: the masked-LM text as shards of token ids, tokenized by every process, read by memory-map.

    <cache>/tokens-<key>/shard-NNNNNN.ids.npy      ids, each text as [CLS] ... [SEP] (uint16; uint32 past 65,536 ids)
    <cache>/tokens-<key>/shard-NNNNNN.starts.npy   1 where a word starts (whole-word masking)
    <cache>/tokens-<key>/shard-NNNNNN.json         the shard's entry: its rows, its tokens and both files' SHA-256
    <cache>/tokens-<key>/manifest.json             every shard's entry, written last, by the main process

Each input file is cut into shards of `shard_rows` rows, numbered across the files in order, and
process r of n tokenizes shards r, r + n, r + 2n, ... Each distinct text counts once, where it first
appears (MTSamples lists many notes under two specialties), so every process reads every row (a
16-byte digest per distinct text) but tokenizes only its own shards, a chunk of rows at a time. The
token stream is the shards in order: the same ids in the same order whatever the process count or
the shard size. The key covers the input files' bytes, the text column, the tokenizer and shard_rows.

A shard whose files match its entry is kept, so a killed tokenization resumes where it stopped; a
file that does not match is named in a warning and its shard rebuilt. Training opens each shard with
np.load(mmap_mode="r") (remote shards are fetched once into a local folder and verified), so memory
does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from medclf import data, jobrecord, layout, manifest, models, runtime, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

FORMAT = 1  # the layout of a store's files; part of its key
BATCH = 256  # texts per call of the fast tokenizer
# Where remote shards are copied for memory-mapping; default: tokens/ in the models' local cache.
LOCAL_CACHE_ENV = "MEDCLF_TOKEN_CACHE"


def run(spec: RunSpec) -> None:
    """The tokenize job: the masked-LM job's token stores (training and validation text) built, or
    completed, on their own (a Slurm job or array of its own); `medclf mlm` then finds them complete."""
    from transformers import AutoTokenizer

    cfg, paths = spec.mlm, layout.Run.of(spec)
    storage.check_writable(paths.cache)
    try:
        tokenizer = AutoTokenizer.from_pretrained(models.resolve(cfg.model))
    except (OSError, ValueError) as e:
        raise MedclfError(
            f"mlm.model: cannot load the tokenizer of {cfg.model!r} ({' '.join(str(e).split())[:200]})"
        ) from None
    accelerator = runtime.make_accelerator(paths.out)  # every rank writes shards into the one cache
    train_urls, validation_url = inputs(spec)
    for urls, what in ((train_urls, "training text"), ([validation_url], "validation text")):
        build(urls, spec.dataset.text_column, tokenizer, paths.cache, cfg.shard_rows, accelerator, what)


def inputs(spec: RunSpec) -> tuple[list[str], str]:
    """The masked-LM job's training CSVs (train, then mlm.extra_text) and its validation CSV."""
    cfg, paths = spec.mlm, layout.Run.of(spec)
    return [cfg.train or paths.prepared_train, *cfg.extra_text], cfg.validation or paths.prepared_validation


# ---------------------------------------------------------------- tokenizing


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What makes two tokenizers produce the same ids: the backend definition, or the vocabulary.

    Not its truncation and padding: calling the tokenizer resets them, so a process that has
    tokenized would otherwise name another store than one that has not (the store never pads or
    truncates)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def tokenize(texts: list[str], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The texts as one stream of ids (each wrapped in [CLS] ... [SEP]) and a word-start flag per token."""
    dtype = id_dtype(tokenizer)
    ids: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    for begin in range(0, len(texts), BATCH):
        enc = tokenizer(texts[begin : begin + BATCH], add_special_tokens=False, verbose=False)
        for i, pieces in enumerate(enc["input_ids"]):
            ids.append(np.array([tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id], dtype=dtype))
            # A piece starts a word unless it continues the word of the piece before (fast tokenizers
            # only know words); special pieces (no word) always start one.
            words = [-1 if w is None else w for w in enc.word_ids(i)] if enc.is_fast else [-1] * len(pieces)
            word = np.asarray(words, dtype=np.int64)
            first = np.ones(len(word) + 2, dtype=np.bool_)
            first[2:-1] = (word[1:] != word[:-1]) | (word[1:] < 0)
            starts.append(first)
    if not ids:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.bool_)
    return np.concatenate(ids), np.concatenate(starts)


def id_dtype(tokenizer: Any) -> type:
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


# ---------------------------------------------------------------- building


@dataclass
class Built:
    """A complete store and what this process did to it."""

    url: str
    stream: Stream
    tokens_built: int = 0  # tokenized by this process now (0: every shard was there and verified)
    seconds: float = 0.0


def build(
    urls: list[str], column: str, tokenizer: Any, cache: str, shard_rows: int, accelerator: Any, what: str = "text"
) -> Built:
    """The store of `urls`' texts under `cache`, built (or completed) by every process together; every
    process must call this. Returns it opened for reading."""
    started = time.perf_counter()
    url = store_url(urls, column, tokenizer, cache, shard_rows)
    rank, world = accelerator.process_index, accelerator.num_processes
    built, count = 0, 0
    complete, known = manifest.exists(url), None  # known: (verified, damaged) of this process's shards
    if complete:
        try:
            known = _verified_mine(url, rank, world)
        except MedclfError as e:  # a damaged manifest: every process sees it, and the main one writes it anew
            log.warning("%s; writing it again", e)
            complete = False
    if not complete:
        check(urls, column, shard_rows)  # every process: all refuse bad input, before any file is written
    if known is None or known[1]:
        built, count = _build_shards(url, urls, column, tokenizer, shard_rows, (rank, world), known)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not complete:
        _write_manifest(url, count)  # the main process has read every row: it knows the count
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    stream = open_stream(url)
    if built:
        log.info(
            "%s: tokenized %d tokens in %.1f s (%.0f tokens/s, this process)", what, built, seconds, built / seconds
        )
    log.info("%s: %d tokens in %d shard(s) at %s", what, len(stream), stream.shards, url)
    return Built(url, stream, built, seconds)


def store_url(urls: list[str], column: str, tokenizer: Any, cache: str, shard_rows: int) -> str:
    key = {
        "format": FORMAT,
        "inputs": [jobrecord.file_fingerprint(u) for u in urls],
        "column": column,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "shard_rows": shard_rows,
    }
    return storage.join(cache, f"tokens-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def check(urls: list[str], column: str, chunk_rows: int) -> None:
    """Every row of every file read and checked (structure, the column, no empty text); nothing kept."""
    for _ in _shards(urls, column, chunk_rows):
        pass


def _shards(urls: list[str], column: str, shard_rows: int) -> Iterator[tuple[int, str, int, list[str]]]:
    """(shard index, file, first row, texts) of every shard of rows, in order; empty texts refused by row."""
    index = 0
    for url in urls:
        first = 0
        for texts in data.read_text_chunks(url, column, shard_rows):
            empty = [i for i, text in enumerate(texts) if not text.strip()]
            if empty:
                raise MedclfError(f"{url}: row {first + empty[0] + 1}: empty {column}")
            yield index, url, first, texts
            index, first = index + 1, first + len(texts)


def _build_shards(
    url: str,
    urls: list[str],
    column: str,
    tokenizer: Any,
    shard_rows: int,
    ranks: tuple[int, int],
    known: Optional[tuple[set[int], set[int]]],
) -> tuple[int, int]:
    """Tokenize and write this process's shards (rank r of n: r, r + n, ...) that are not there and
    verified; `known`: the shards already verified, and those found damaged. Returns the tokens
    written and the number of shards."""
    rank, world = ranks
    seen: set[bytes] = set()
    written, count = 0, 0
    for index, source, first, texts in _shards(urls, column, shard_rows):
        mine, count = index % world == rank, index + 1
        kept = []
        for text in texts:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(text)
        if not mine or (index in known[0] if known else _verified(url, index) is not None):
            continue
        ids, starts = tokenize(kept, tokenizer)
        _write_shard(url, index, ids, starts, {"source": source, "first_row": first, "rows": len(texts)})
        written += len(ids)
        log.info("shard %d (%s rows %d-%d): %d tokens", index, source, first + 1, first + len(texts), len(ids))
    return written, count


def _write_shard(url: str, index: int, ids: np.ndarray, starts: np.ndarray, about: dict) -> None:
    """The shard's two arrays, then its entry (a shard without an entry is not there)."""
    name = shard_name(index)
    files = {}
    for suffix, array in (("ids", ids), ("starts", starts)):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        storage.write_bytes(storage.join(url, f"{name}.{suffix}.npy"), buffer.getvalue())
        files[f"{name}.{suffix}.npy"] = manifest.entry(buffer.getvalue())
    entry = {"shard": index, **about, "tokens": len(ids), "dtype": str(ids.dtype), "files": files}
    storage.write_json(storage.join(url, f"{name}.json"), entry)


def _verified(url: str, index: int) -> Optional[dict]:
    """The shard's entry when the shard is there and its files match it; None (with a warning naming
    the file, when it is there but damaged) when it must be built."""
    entry_url = storage.join(url, f"{shard_name(index)}.json")
    if not storage.exists(entry_url):
        return None
    try:
        entry = storage.read_json(entry_url)
        files = entry["files"]
        for name, expected in files.items():
            file_url = storage.join(url, name)
            if not storage.exists(file_url):
                log.warning("%s: missing, its entry %s lists it; rebuilding shard %d", file_url, entry_url, index)
                return None
            if jobrecord.file_fingerprint(file_url) != expected["sha256"]:
                log.warning("%s: SHA-256 differs from its entry; rebuilding shard %d", file_url, index)
                return None
    except (MedclfError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: not a shard entry (%s); rebuilding shard %d", entry_url, str(e)[:120], index)
        return None
    return entry


def _verified_mine(url: str, rank: int, world: int) -> tuple[set[int], set[int]]:
    """This process's shards of a complete store: those that match their entries, and those that do not."""
    count = len(manifest.read(url, "token store")["shards"])
    good = {index for index in range(rank, count, world) if _verified(url, index) is not None}
    return good, set(range(rank, count, world)) - good


def _write_manifest(url: str, count: int) -> None:
    """The store's manifest: every shard's entry in order (the main process, once all are written)."""
    entries = []
    for index in range(count):
        entry_url = storage.join(url, f"{shard_name(index)}.json")
        if not storage.exists(entry_url):
            raise MedclfError(f"{entry_url}: missing after every process tokenized its shards (shared storage?)")
        entries.append(storage.read_json(entry_url))
    files = {name: e for entry in entries for name, e in entry["files"].items()}
    shards = [{"shard": e["shard"], "tokens": e["tokens"], "dtype": e["dtype"]} for e in entries]
    listing = {"tokens": sum(e["tokens"] for e in entries), "shards": shards, "files": dict(sorted(files.items()))}
    storage.write_json(storage.join(url, manifest.MANIFEST), listing)


# ---------------------------------------------------------------- reading


class Stream:
    """A store's token stream read by memory-map: the ids and word starts of any range of tokens.

    The arrays are opened lazily in each process (a DataLoader worker opens its own maps)."""

    def __init__(self, folder: str, names: list[str], counts: list[int]):
        self.folder, self.names = folder, names
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._arrays: Optional[list[tuple[np.ndarray, np.ndarray]]] = None

    @property
    def shards(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # a worker maps the files itself, never gets a copy

    def _open(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            self._arrays = [(self._map(f"{name}.ids.npy"), self._map(f"{name}.starts.npy")) for name in self.names]
        return self._arrays

    def _map(self, name: str) -> np.ndarray:
        path = os.path.join(self.folder, name)
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def tokens(self, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids (int64) and word starts (bool) of tokens [begin, end) of the stream."""
        arrays = self._open()
        shard = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        ids, starts = [], []
        while begin < end:
            low = begin - int(self.offsets[shard])
            high = min(end, int(self.offsets[shard + 1])) - int(self.offsets[shard])
            ids.append(arrays[shard][0][low:high])
            starts.append(arrays[shard][1][low:high])
            begin += high - low
            shard += 1
        return np.concatenate(ids).astype(np.int64), np.concatenate(starts).astype(np.bool_)


class StreamBlocks:
    """Full blocks of `length` tokens of a stream, no padding (the tail shorter than a block is dropped):
    block i is (ids, word starts) of tokens [i * length, (i + 1) * length)."""

    def __init__(self, stream: Stream, length: int):
        self.stream, self.length = stream, length

    def __len__(self) -> int:
        return len(self.stream) // self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.stream.tokens(index * self.length, (index + 1) * self.length)


def open_stream(url: str) -> Stream:
    """The store at `url` for reading: a local store in place, a remote one from its verified local copy."""
    listing = manifest.read(url, "token store")
    names = [shard_name(s["shard"]) for s in listing["shards"]]
    counts = [s["tokens"] for s in listing["shards"]]
    folder = storage.local_path(url) if storage.is_local(url) else _fetched(url, listing["files"])
    return Stream(folder, names, counts)


def _fetched(url: str, files: dict[str, dict]) -> str:
    """A local copy of a remote store's files, each fetched once and verified against the manifest."""
    root = os.environ.get(LOCAL_CACHE_ENV) or os.path.join(models.CACHE, "tokens")
    folder = os.path.join(root, url.rstrip("/").rsplit("/", 1)[-1])
    os.makedirs(folder, exist_ok=True)
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if os.path.exists(path) and jobrecord.file_fingerprint(path) == expected["sha256"]:
            continue
        partial = f"{path}.partial-{os.getpid()}"
        with storage.open_read(storage.join(url, name)) as source, open(partial, "wb") as target:
            for block in iter(lambda: source.read(8 << 20), b""):
                target.write(block)
        if jobrecord.file_fingerprint(partial) != expected["sha256"]:
            os.remove(partial)
            raise MedclfError(f"{storage.join(url, name)}: SHA-256 differs from the store's manifest (file altered)")
        os.replace(partial, path)
    return folder
