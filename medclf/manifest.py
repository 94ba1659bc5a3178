"""Manifests: the one proof that a folder (checkpoint, adapted model, classifier) is complete and intact.

    <folder>/manifest.json    {"files": {name: {"size": ..., "sha256": ...}}, ...}, written LAST

A folder without a manifest, or with an `.incomplete` marker (publish_dir writes it first and
removes it last), is an interrupted save and is never loaded; a file whose size or
hash differs from the manifest is refused by name. Every folder medclf writes is built, written
and verified here, so every job refuses a bad file with the same words, and a model's
fingerprint is taken from its verified manifest instead of hashing its files again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Optional

from medclf import storage
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# In a published folder while it is being (re)written: written first, removed after the manifest.
INCOMPLETE = ".incomplete"
# Test hook: seconds to sleep after the files are written and before the manifest (of a checkpoint
# or a published model), so a test can kill the job or freeze the storage while a save is half-done.
PAUSE_ENV = "MEDCLF_TEST_PAUSE_IN_CHECKPOINT"


def entry(data: bytes) -> dict:
    """A file's line in a manifest."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def of_local_dir(folder: str) -> dict[str, dict]:
    """{relative name: entry} of every file under a local folder."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder).replace(os.sep, "/")] = entry(f.read())
    return files


def write(url: str, files: dict[str, dict], **extra: object) -> None:
    """The manifest of `url`, to be written after every file it lists."""
    _test_pause(url)
    storage.write_json(storage.join(url, MANIFEST), {**extra, "files": dict(sorted(files.items()))})


def exists(url: str) -> bool:
    """Whether `url` has a manifest, i.e. was completely written (verify() checks its files too)."""
    return storage.exists(storage.join(url, MANIFEST))


def publish_dir(local_dir: str, url: str) -> None:
    """Upload a local folder (a save_pretrained model, a classifier) to `url`, its manifest written last.

    The INCOMPLETE marker goes in first and comes out last: from the moment an older copy starts
    being replaced until the new manifest is written, every reader refuses the folder, even one
    that (like a model folder) would accept a folder without a manifest from another tool."""
    marker = storage.join(url, INCOMPLETE)
    storage.write_bytes(marker, b"publishing; a folder with this file was never completely written\n")
    storage.remove(storage.join(url, MANIFEST))  # an older copy being replaced is never "complete"
    for name in storage.listdir(url):
        if name != INCOMPLETE:
            storage.remove(storage.join(url, name))
    storage.upload_dir(local_dir, url)
    write(url, of_local_dir(local_dir))
    storage.remove(marker)


def check_not_incomplete(url: str, what: str = "model", shown: Optional[str] = None) -> None:
    """Refuse a folder whose publishing was interrupted (its INCOMPLETE marker is still there)."""
    if storage.exists(storage.join(url, INCOMPLETE)):
        raise MedclfError(
            f"{shown or url}: incomplete {what} (its publishing was interrupted: {INCOMPLETE} present); "
            "re-run the job that writes it with overwrite=true"
        )


def read(url: str, what: str = "checkpoint") -> dict:
    """The manifest of `url`, refused when it is missing (an incomplete folder) or not a manifest."""
    check_not_incomplete(url, what)
    manifest_url = storage.join(url, MANIFEST)
    if not storage.exists(manifest_url):
        raise MedclfError(f"{url}: incomplete {what} (no {MANIFEST})")
    manifest = storage.read_json(manifest_url)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise MedclfError(f"{manifest_url}: not a {what} manifest")
    for name, e in manifest["files"].items():
        size, sha256 = (e.get("size"), e.get("sha256")) if isinstance(e, dict) else (None, None)
        if type(size) is not int or not isinstance(sha256, str) or len(sha256) != 64:
            raise MedclfError(f"{manifest_url}: malformed entry for {name!r} (expected size and sha256)")
    return manifest


def read_verified(url: str, name: str, manifest: dict, shown: Optional[str] = None) -> bytes:
    """A listed file's bytes, refused by name if its size or SHA-256 differs from the manifest.

    `shown`: the URL to name in errors when `url` is a local copy of it (a fetched model)."""
    expected = manifest["files"].get(name)
    file_url = storage.join(shown or url, name)
    if expected is None:
        raise MedclfError(f"{file_url}: not listed in the manifest")
    data = storage.read_bytes(storage.join(url, name))
    if len(data) != expected.get("size"):
        raise MedclfError(f"{file_url}: {len(data)} bytes, manifest says {expected.get('size')} (truncated?)")
    if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        raise MedclfError(f"{file_url}: SHA-256 differs from the manifest (file altered)")
    return data


def verify(url: str, what: str = "checkpoint", shown: Optional[str] = None) -> dict:
    """Check every file of `url` against its manifest; returns the manifest."""
    manifest = read(url, what)
    for name in manifest["files"]:
        read_verified(url, name, manifest, shown)
    return manifest


def verify_if_present(folder: str, shown: str) -> Optional[dict]:
    """verify() for a model folder published by medclf, errors naming `shown` (the reference the user
    gave); None for a folder written by other tools (neither a manifest nor an INCOMPLETE marker)."""
    check_not_incomplete(folder, "model", shown)
    return verify(folder, "model", shown) if exists(folder) else None


# ---------------------------------------------------------------- sealed cache files


def _tensors_digest(tensors: dict) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def sealed(tensors: dict, metadata: Optional[dict] = None) -> bytes:
    """A safetensors file that carries the SHA-256 of its own tensors (a cache file's manifest)."""
    from safetensors.torch import save

    return save(tensors, metadata={**(metadata or {}), "sha256": _tensors_digest(tensors)})


def read_sealed(url: str, what: str) -> Optional[dict]:
    """The tensors of a `sealed` file; None when it is absent, or damaged (truncated, altered,
    unsealed), with a warning: a cache is rebuilt then, never used."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not storage.exists(url):
        return None
    data = storage.read_bytes(url)
    try:
        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        expected = (header.get("__metadata__") or {}).get("sha256")
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        log.warning("%s: damaged %s (%s); rebuilding it", url, what, " ".join(str(e).split())[:120])
        return None
    if expected != _tensors_digest(tensors):
        log.warning("%s: damaged %s (SHA-256 differs from its seal); rebuilding it", url, what)
        return None
    return tensors


def fingerprint(manifest: dict) -> str:
    """A content fingerprint of a verified folder, from the hashes its manifest lists."""
    listing = sorted((name, e.get("sha256")) for name, e in manifest["files"].items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:20]


def _test_pause(url: str) -> None:
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause:
        log.warning("%s=%s: pausing before the manifest of %s", PAUSE_ENV, pause, url)
        time.sleep(pause)
