"""Where a model comes from: a hub id, a local folder, or an fsspec URL of a folder (fetched once).

Every job that loads an encoder resolves its reference here, so they all accept the same forms
and reject a folder that is not a BERT-family checkpoint with the same one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Optional

from medclf import storage
from medclf.errors import MedclfError

# Encoders whose [CLS] vector, masked-LM head and WordPiece tokenizer fit this project.
BERT_FAMILY = {
    "bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta", "camembert", "modernbert",
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CACHE = os.environ.get("MEDCLF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medclf"))


def resolve(ref: str) -> str:
    """A local folder or hub id that `from_pretrained` can load, fetching remote folders once."""
    if storage.is_local(ref):
        path = storage.local_path(ref)
        if os.path.isdir(path):
            check_bert_family(path, ref)
            return path
        if HUB_ID.match(path):
            return path  # bert-base-uncased or org/name: transformers fetches and caches it
        raise MedclfError(f"{ref}: no such model folder")
    local = os.path.join(CACHE, "models", _fingerprint(ref))
    done = os.path.join(local, ".complete")
    if not os.path.exists(done):
        # Fetch into a fresh folder, then mark it complete; a stopped fetch is redone next time.
        tmp = f"{local}.tmp-{os.getpid()}"
        storage.download_dir(ref, tmp)
        check_bert_family(tmp, ref)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
        open(done, "w").close()
    return local


def _fingerprint(url: str) -> str:
    """Names, sizes and versions of a remote folder's files: a changed model is fetched again."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)
    try:
        files = fs.find(path, detail=True)
    except Exception as e:  # noqa: BLE001
        raise MedclfError(f"{url}: {storage.describe_error(e)}") from None
    if not files:
        raise MedclfError(f"{url}: no such model folder, or it is empty")
    listing = sorted(
        (name, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("created") or ""))
        for name, info in files.items()
    )
    return hashlib.sha256(json.dumps([url, listing], default=str).encode()).hexdigest()[:20]


def check_bert_family(folder: str, ref: Optional[str] = None) -> dict:
    """The folder's config.json, if it describes a BERT-family model; else one MedclfError line."""
    ref = ref or folder
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise MedclfError(f"{ref}: not a model folder (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedclfError(f"{ref}: config.json is not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in BERT_FAMILY:
        raise MedclfError(f"{ref}: model_type {model_type!r} is not a BERT-family encoder")
    return config


def max_positions(folder_or_id: str) -> Optional[int]:
    """The longest input the model accepts, when its config says."""
    if os.path.isdir(folder_or_id):
        return check_bert_family(folder_or_id).get("max_position_embeddings")
    return None
