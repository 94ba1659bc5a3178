"""Training state to and from storage URLs: a checkpoint is complete when its manifest exists.

    <root>/step-0000500/model.safetensors        weights (tied copies stored once)
                        optimizer.{safetensors,json}, scheduler.{safetensors,json}
                        rng-rank00000.safetensors  torch/cuda/numpy/python RNG of each rank
                        state.json                 step, epoch, position in the data, metrics so far
                        state.safetensors          the state's tensors, when it has any (fine-tuning)
                        spec.yaml                  the resolved spec of the run
                        manifest.json              size and SHA-256 of every file above, written LAST
    <root>/latest                                  "step-0000500", updated after the manifest

Nothing is pickled: tensors go to safetensors, everything else to JSON. The manifest (built,
written and verified by medclf/manifest.py) makes a folder complete: a folder without one is an
interrupted save and is never loaded; a file whose size or hash differs is refused by name.
`find_latest` starts from the checkpoint `latest` names and walks back to the first one that verifies.

The jobs that checkpoint (mlm, fine-tuning in head) share the rest too: `choose` picks what to resume
from, `resume` restores it once it was made with the same settings, and `State` is the common part
of what each loop carries from step to step.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional, TypeVar, cast

import numpy as np
import torch
from accelerate.utils import broadcast
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from medclf import manifest, storage
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

STEP_FOLDER = re.compile(r"^step-(\d{7,})$")
LATEST = "latest"


def step_url(root: str, step: int) -> str:
    return storage.join(root, f"step-{step:07d}")


def rng_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.safetensors"


# ---------------------------------------------------------------- saving


def save(
    root: str,
    step: int,
    accelerator: Any,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict,
    spec_yaml: str,
    keep_last: int,
) -> str:
    """Every rank calls this at the same step; returns the checkpoint URL once it is complete."""
    url = step_url(root, step)
    main = accelerator.is_main_process
    if main:
        storage.remove(url)  # leftovers of an interrupted save at this step
    accelerator.wait_for_everyone()

    # -- each rank its own RNG; the main process everything that is the same on all ranks
    written: dict[str, bytes] = {}
    rng_bytes = _rng_bytes()
    storage.write_bytes(storage.join(url, rng_name(accelerator.process_index)), rng_bytes)
    if main:
        written[rng_name(0)] = rng_bytes
        written["model.safetensors"] = _model_bytes(model)
        for name, obj in (("optimizer", optimizer.state_dict()), ("scheduler", scheduler.state_dict())):
            tree, tensors = encode(obj)
            written[f"{name}.safetensors"] = save_tensors(tensors)
            written[f"{name}.json"] = _json_bytes(tree)
        tree, tensors = encode({**state, "step": step, "world_size": accelerator.num_processes})
        written["state.json"] = _json_bytes(tree)
        if tensors:
            written["state.safetensors"] = save_tensors(tensors)
        written["spec.yaml"] = spec_yaml.encode("utf-8")
        for name, data in written.items():
            if not name.startswith("rng-"):
                storage.write_bytes(storage.join(url, name), data)
    accelerator.wait_for_everyone()

    # -- the manifest last, then the pointer, then pruning: a reader never trusts a partial folder
    if main:
        for rank in range(1, accelerator.num_processes):
            written[rng_name(rank)] = storage.read_bytes(storage.join(url, rng_name(rank)))
        manifest.write(url, {name: manifest.entry(data) for name, data in written.items()}, step=step)
        storage.write_text(storage.join(root, LATEST), f"step-{step:07d}\n")
        _prune(root, keep_last, step)
        log.info("checkpoint saved: %s", url)
    accelerator.wait_for_everyone()
    return url


def _prune(root: str, keep_last: int, newest: int) -> None:
    complete = [s for s in list_steps(root) if manifest.exists(step_url(root, s))]
    for step in list_steps(root):
        stale_partial = step < newest and step not in complete
        beyond_k = step in complete and complete.index(step) < len(complete) - keep_last
        if stale_partial or beyond_k:
            # The manifest goes first: a prune killed halfway leaves a folder that is plainly incomplete.
            storage.remove(storage.join(step_url(root, step), manifest.MANIFEST))
            storage.remove(step_url(root, step))


def _model_bytes(model: torch.nn.Module) -> bytes:
    # Tied weights (decoder = word embeddings) share storage; safetensors wants each stored once.
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else (name,)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return save_tensors(tensors, metadata={"aliases": json.dumps(aliases)})


def _rng_bytes() -> bytes:
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # legacy=True: a tuple
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, words, gauss = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [version, list(words), gauss],
    }
    return save_tensors(tensors, metadata={"json": json.dumps(meta)})


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


# ---------------------------------------------------------------- state trees <-> JSON + tensors


def encode(obj: Any, tensors: Optional[dict] = None, path: str = "t") -> tuple[Any, dict]:
    """A nested state_dict as JSON plus a flat {name: tensor}; tuples and non-string keys survive."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().cpu()
        return {"__tensor__": path}, tensors
    if isinstance(obj, dict):
        items = [
            [encode(k, tensors, f"{path}.k{i}")[0], encode(v, tensors, f"{path}.{i}")[0]]
            for i, (k, v) in enumerate(obj.items())
        ]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: v for k, v in items}, tensors
        return {"__items__": items}, tensors
    if isinstance(obj, (list, tuple)):
        seq = [encode(v, tensors, f"{path}.{i}")[0] for i, v in enumerate(obj)]
        return ({"__tuple__": seq} if isinstance(obj, tuple) else seq), tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def decode(tree: Any, tensors: dict) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(decode(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {decode(k, tensors): decode(v, tensors) for k, v in tree["__items__"]}
        return {k: decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    return tree


# ---------------------------------------------------------------- finding and verifying


def list_steps(root: str) -> list[int]:
    """Steps of the checkpoint folders under `root` (complete or not), oldest first, listed fresh."""
    return sorted(int(m.group(1)) for name in storage.listdir(root) if (m := STEP_FOLDER.match(name)))


def find_latest(root: str) -> Optional[str]:
    """The checkpoint `latest` names, once it verifies; else the newest older one that verifies,
    warning about each one passed over. Without a readable `latest`, the newest one that verifies."""
    steps = list_steps(root)
    named = read_latest(root)
    if named is not None:
        steps = [s for s in steps if s < named] + [named]  # never a newer folder `latest` does not vouch for
    for step in reversed(steps):
        url = step_url(root, step)
        try:
            manifest.verify(url)
            return url
        except MedclfError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def read_latest(root: str) -> Optional[int]:
    """The step `<root>/latest` names; None when there is no such file or it names no checkpoint."""
    url = storage.join(root, LATEST)
    if not storage.exists(url):
        return None
    text = storage.read_text(url).strip()
    match = STEP_FOLDER.match(text)
    if match is None:
        log.warning("%s: %r names no checkpoint; looking at every checkpoint", url, text[:40])
        return None
    return int(match.group(1))


# ---------------------------------------------------------------- loading


def load(url: str, accelerator: Any, *, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG from `url`; returns the saved state."""
    listing = manifest.read(url)

    # -- weights: tied copies were stored once, so exactly the aliases may be missing
    data = manifest.read_verified(url, "model.safetensors", listing)
    tensors = load_tensors(data)
    aliases = json.loads(_metadata(data).get("aliases", "{}"))
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - set(aliases)
    if missing or result.unexpected_keys:
        raise MedclfError(
            f"{url}/model.safetensors: does not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]})"
        )

    # -- optimizer and scheduler
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        tensors = load_tensors(manifest.read_verified(url, f"{name}.safetensors", listing))
        tree = json.loads(manifest.read_verified(url, f"{name}.json", listing))
        target.load_state_dict(decode(tree, tensors))

    # -- this rank's RNG (a run resumed on another number of ranks cannot be exact: say so)
    name = rng_name(accelerator.process_index)
    if name in listing["files"]:
        _set_rng(manifest.read_verified(url, name, listing))
    else:
        log.warning(
            "%s: no RNG state for rank %d (saved by fewer ranks); continuing unseeded-exactly",
            url,
            accelerator.process_index,
        )
    tree = json.loads(manifest.read_verified(url, "state.json", listing))
    has_tensors = "state.safetensors" in listing["files"]
    return decode(tree, load_tensors(manifest.read_verified(url, "state.safetensors", listing)) if has_tensors else {})


def _metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}


def _set_rng(data: bytes) -> None:
    tensors = load_tensors(data)
    meta = json.loads(_metadata(data)["json"])
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, words, gauss_next = meta["python"]
    random.setstate((version, tuple(words), gauss_next))


# ---------------------------------------------------------------- resuming a job


StateT = TypeVar("StateT", bound="State")


@dataclass
class State:
    """What a training loop carries from step to step: the schema of a checkpoint's state (each job
    adds its own fields; tensors among them go to state.safetensors)."""

    step: int = 0
    run: dict = field(default_factory=dict)  # the settings (and inputs) the run was made with
    world_size: int = 1  # written by `save`

    @classmethod
    def from_json(cls: type[StateT], saved: dict) -> StateT:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def choose(resume: str, root: str, overwrite: bool, accelerator: Any, start_over: str) -> Optional[str]:
    """The checkpoint under `root` to continue from, or None, as `resume` (auto, never or a URL) says;
    the main process picks a verified one and tells the others. overwrite=true starts over: nothing
    is resumed, and `start_over` (the job's folder, checkpoints included) is removed."""
    main = accelerator.is_main_process
    resume_url = None
    if resume == "never":
        if list_steps(root) and not overwrite:
            raise MedclfError(f"{root}: checkpoints exist; resume=auto continues them, overwrite=true starts over")
    elif resume == "auto":
        found = find_latest(root) if main and not overwrite else None
        chosen = broadcast(torch.tensor([int(found.rsplit("-", 1)[1]) if found else -1], device=accelerator.device))
        resume_url = step_url(root, int(chosen.item())) if chosen.item() >= 0 else None
    else:
        resume_url = resume
        if main:
            manifest.verify(resume_url)
    if main and resume_url is None and overwrite:
        storage.remove(start_over)
    accelerator.wait_for_everyone()
    return resume_url


def resume(url: str, accelerator: Any, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, run: dict) -> dict:
    """`load`, refused before anything is restored when the checkpoint was made with other `run`
    settings; returns the saved state."""
    saved = json.loads(manifest.read_verified(url, "state.json", manifest.read(url)))
    check_same_settings(url, saved.get("run") or {}, run)
    return load(url, accelerator, model=model, optimizer=optimizer, scheduler=scheduler)


def check_same_settings(url: str, saved: dict, now: dict) -> None:
    """Refuse, in one line naming every changed key with both values, a checkpoint made otherwise."""
    changed = [f"{k}={saved.get(k)!r} there, {v!r} now" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise MedclfError(
            f"{url}: made with other settings ({'; '.join(changed)}); "
            "set them back to continue it, or overwrite=true to start over"
        )
