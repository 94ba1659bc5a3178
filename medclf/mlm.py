"""The masked-LM job: adapt a BERT-family encoder to the training notes, without Trainer.

    medclf mlm jobs/tiny-cpu.yaml                                  # one process
    accelerate launch --config_file accelerate_config.yaml -m medclf mlm jobs/mtsamples.yaml

Reads <out>/prepare/train.csv (never validation) plus `mlm.extra_text`; writes
<out>/mlm/checkpoints/step-NNNNNNN/, <out>/mlm/model/ (save_pretrained, manifest last) and
<out>/mlm/metrics.json. The loop is written so that a run resumed from any checkpoint ends with
the same weights as an uninterrupted one, and one global batch gives the same step on any number
of processes: data order and masks depend only on (seed, epoch, block), and every micro-batch's
loss is divided by the number of masked tokens in the whole global batch.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, get_linear_schedule_with_warmup

from medclf import checkpoint, config, data, manifest, models, runtime, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError, Preempted
from medclf.masking import IGNORE, Masker, epoch_order, pack, token_stream

log = logging.getLogger(__name__)

# Keys that shape the trajectory: a checkpoint made with other values cannot be continued.
RESUME_KEYS = (
    "model",
    "train",
    "extra_text",
    "text_column",
    "max_length",
    "mlm_probability",
    "whole_word_masking",
    "batch_size",
)
# Test hook: seconds to sleep after every step, so a test can signal a run that is mid-training.
STEP_SLEEP_ENV = "MEDCLF_TEST_STEP_SLEEP"


class MaskedLM(torch.nn.Module):
    """A masked-LM model whose forward returns the summed loss over masked positions only.

    The stock forward projects every position onto the vocabulary (512 × 30,522 logits per
    block) and then ignores 85% of them; here the encoder's hidden states are gathered at the
    masked positions first and only those go through the model's own prediction head.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head = prediction_head(self.model)
        where = labels != IGNORE
        if head is None:  # an architecture without a known head: the stock (full-projection) loss
            return self.model(input_ids=input_ids, labels=labels).loss * where.sum()
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state
        logits = head(hidden[where])
        return F.cross_entropy(logits.float(), labels[where], reduction="sum")


def prediction_head(model: torch.nn.Module):
    """The masked-LM head: `cls` in BERT, `lm_head` in RoBERTa-style models."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


def adamw(groups: list, lr: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: ~10× faster on the dense 30k-word embedding update on CPU."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def run(spec: RunSpec) -> None:
    cfg = spec.mlm
    out = storage.join(spec.out, "mlm")
    checkpoints, model_url = storage.join(out, "checkpoints"), storage.join(out, "model")
    train_urls = [cfg.train or storage.join(spec.out, "prepare", "train.csv"), *cfg.extra_text]
    validation_url = cfg.validation or storage.join(spec.out, "prepare", "validation.csv")
    stop = runtime.StopSignal()
    try:
        _run(spec, cfg, out, checkpoints, model_url, train_urls, validation_url, stop)
    finally:
        stop.restore()


def _run(spec, cfg, out, checkpoints, model_url, train_urls, validation_url, stop) -> None:
    # -- check inputs before any heavy work
    for key in ("max_length", "batch_size", "micro_batch_size", "checkpoint_every", "keep_last", "log_every"):
        if getattr(cfg, key) < 1:
            raise MedclfError(f"mlm.{key}: must be at least 1, got {getattr(cfg, key)}")
    storage.check_writable(out)
    if not 0 < cfg.mlm_probability < 1:
        raise MedclfError(f"mlm.mlm_probability: must be between 0 and 1, got {cfg.mlm_probability}")
    model_path = models.resolve(cfg.model)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except OSError as e:
        raise MedclfError(f"mlm.model: cannot load {cfg.model!r} ({' '.join(str(e).split())[:200]})") from None
    offset = 2 if model_config.model_type in ("roberta", "xlm-roberta", "camembert") else 0  # RoBERTa skips 2 positions
    limit = model_config.max_position_embeddings - offset
    if cfg.max_length > limit:
        raise MedclfError(f"mlm.max_length: {cfg.max_length} is above what {cfg.model} accepts ({limit} positions)")
    if manifest.exists(model_url) and not spec.overwrite:
        raise MedclfError(f"{model_url}: output exists; set overwrite=true to replace it")

    # -- accelerator: the global batch fixes the accumulation, whatever the process count
    trackers_dir = None
    if cfg.report_to != "none":  # trackers write local files: next to the outputs, or a temp folder
        local_out = storage.is_local(out)
        trackers_dir = storage.local_path(storage.join(out, "trackers")) if local_out else tempfile.mkdtemp()
    accelerator = runtime.make_accelerator(report_to=cfg.report_to, project_dir=trackers_dir)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    accumulation = runtime.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, world, key="mlm.batch_size")
    accelerator.gradient_accumulation_steps = accumulation
    runtime.seed_everything(spec.seed)

    # -- resume or start over: the main process picks a verified checkpoint and tells the others
    resume_url = None
    if cfg.resume == "never":
        if checkpoint.list_steps(checkpoints) and not spec.overwrite:
            raise MedclfError(
                f"{checkpoints}: checkpoints exist; resume=auto continues them, overwrite=true starts over"
            )
    elif cfg.resume == "auto":
        found = checkpoint.find_latest(checkpoints) if main else None
        chosen = broadcast(torch.tensor([int(found.rsplit("-", 1)[1]) if found else -1], device=accelerator.device))
        resume_url = checkpoint.step_url(checkpoints, int(chosen.item())) if chosen.item() >= 0 else None
    else:
        resume_url = cfg.resume
        if main:
            manifest.verify(resume_url)
    if main and resume_url is None and spec.overwrite:
        storage.remove(out)
    accelerator.wait_for_everyone()

    # -- data: tokenized once (main process first, then read from the cache), packed into full blocks
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cache = storage.join(spec.out, "cache")
    with accelerator.main_process_first():
        train_ids, train_starts = token_stream(_texts(train_urls, cfg.text_column), tokenizer, cache)
        val_ids, val_starts = token_stream(_texts([validation_url], cfg.text_column), tokenizer, cache)
    blocks, starts = pack(train_ids, cfg.max_length), pack(train_starts, cfg.max_length)
    steps_per_epoch = len(blocks) // cfg.batch_size
    if steps_per_epoch == 0:
        raise MedclfError(
            f"mlm.batch_size: {cfg.batch_size} blocks per step, but the training text fills only {len(blocks)}"
        )
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    # Random replacement tokens come from the ids both the tokenizer and the embedding know.
    masker = Masker(
        tokenizer.mask_token_id,
        min(len(tokenizer), model_config.vocab_size),
        tokenizer.all_special_ids,
        cfg.mlm_probability,
        cfg.whole_word_masking,
    )
    val_blocks, val_block_starts = pack(val_ids, cfg.max_length), pack(val_starts, cfg.max_length)
    val_blocks, val_block_starts = val_blocks[: cfg.eval_blocks], val_block_starts[: cfg.eval_blocks]
    if len(val_blocks) == 0:
        raise MedclfError(f"{validation_url}: too little text for one block of mlm.max_length={cfg.max_length} tokens")
    val_inputs, val_labels = masker.batch(val_blocks, val_block_starts, range(len(val_blocks)), cfg.eval_seed, epoch=-1)
    log.info(
        "train: %d blocks of %d tokens, %d steps/epoch, %d steps; validation: %d blocks; "
        "%d process(es) × %d micro-batches",
        len(blocks),
        cfg.max_length,
        steps_per_epoch,
        total_steps,
        len(val_blocks),
        world,
        accumulation,
    )

    # -- model: a checkpoint without masked-LM head weights (MiniLM) gets a fresh head
    hf_model, loading = AutoModelForMaskedLM.from_pretrained(model_path, output_loading_info=True)
    if loading["missing_keys"]:
        log.warning(
            "%s has no masked-LM head weights; initialised %d tensors (%s)",
            cfg.model,
            len(loading["missing_keys"]),
            ", ".join(sorted(loading["missing_keys"])[:4]),
        )
    model = MaskedLM(hf_model)

    # -- optimizer (no decay on biases and LayerNorm weights: the 1-d parameters) and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    # The scheduler stays unprepared: Accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    # -- resume: weights, optimizer, scheduler, every rank's RNG, position in the data
    run_keys = {k: getattr(cfg, k) for k in RESUME_KEYS} | {"seed": spec.seed, "train_blocks": len(blocks)}
    state = {"history": [], "val_before": None, "train_seconds": 0.0, "first_step_loss": None}
    step = 0
    if resume_url:
        state = checkpoint.load(resume_url, accelerator, model=raw.model, optimizer=optimizer, scheduler=scheduler)
        changed = [f"{k}={state['run'][k]!r} there, {v!r} now" for k, v in run_keys.items() if state["run"].get(k) != v]
        if changed:
            raise MedclfError(
                f"{resume_url}: made with other settings ({'; '.join(changed)}); "
                "resume=never overwrite=true starts over"
            )
        step = state["step"]
        log.info("resumed from %s at step %d (epoch %d)", resume_url, step, step // steps_per_epoch)
    if cfg.report_to != "none":
        accelerator.init_trackers("medclf-mlm", config=_flat(config.to_dict(spec)))

    def evaluate() -> dict:
        return _evaluate(model, val_inputs, val_labels, accelerator, cfg.micro_batch_size)

    if state["val_before"] is None:
        state["val_before"] = evaluate()
        log.info(
            "validation before: loss %.4f, perplexity %.2f",
            state["val_before"]["loss"],
            state["val_before"]["perplexity"],
        )

    def save(at_step: int) -> str:
        return checkpoint.save(
            checkpoints,
            at_step,
            accelerator,
            model=raw.model,
            optimizer=optimizer,
            scheduler=scheduler,
            spec_yaml=config.to_yaml(spec),
            state={
                **state,
                "run": run_keys,
                "epoch": at_step // steps_per_epoch,
                "blocks_done_in_epoch": at_step % steps_per_epoch * cfg.batch_size,
            },
            keep_last=cfg.keep_last,
        )

    # -- the loop: one global batch per step, split into this rank's micro-batches
    tokens_per_step = cfg.batch_size * cfg.max_length
    progress = runtime.Progress(accelerator, total_steps, start=step, desc="mlm", unit="tokens")
    step_sleep = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)
    model.train()
    order, order_epoch, saved_at = None, None, step if resume_url else None
    while step < total_steps:
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = epoch_order(len(blocks), spec.seed, epoch), epoch
        indices = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        inputs, labels = masker.batch(blocks, starts, indices, spec.seed, epoch)
        masked = max(int((labels != IGNORE).sum()), 1)
        # DDP averages gradients over ranks and backward() divides by the accumulation: undo both,
        # so the gradient is the global batch's mean loss over its masked tokens.
        scale = world * accumulation / masked

        # forward and backward; clip and step once the last micro-batch has synced gradients
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for micro in range(accumulation):
            first = (micro * world + rank) * cfg.micro_batch_size
            rows = slice(first, first + cfg.micro_batch_size)
            with accelerator.accumulate(model):
                loss = model(inputs[rows].to(accelerator.device), labels[rows].to(accelerator.device))
                accelerator.backward(loss * scale)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().double()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        step_loss = accelerator.reduce(loss_sum, reduction="sum").item() / masked
        state["train_seconds"] += time.perf_counter() - started
        if state["first_step_loss"] is None:
            state["first_step_loss"] = step_loss

        # log
        progress.update(tokens_per_step, loss=step_loss, lr=lr)
        state["history"].append([step, step_loss, lr])
        if step % cfg.log_every == 0 or step == total_steps:
            progress.log(loss=step_loss, lr=lr)
            accelerator.log({"train/loss": step_loss, "train/lr": lr, "train/tokens_per_s": progress.rate()}, step=step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            val = evaluate()
            progress.log(val_loss=val["loss"], val_perplexity=val["perplexity"])
            accelerator.log({"val/loss": val["loss"], "val/perplexity": val["perplexity"]}, step=step)

        # checkpoint, and stop (all ranks agree) after a SIGTERM/SIGUSR1
        if step_sleep:
            time.sleep(step_sleep)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save(step)
            saved_at = step
        if step < total_steps and stop.requested(accelerator):
            url = save(step) if saved_at != step else checkpoint.step_url(checkpoints, step)
            progress.close()
            raise Preempted(f"stopped at step {step}/{total_steps}; checkpoint {url}")
    progress.close()
    if saved_at != step:  # resumed from the final checkpoint: make sure it is there
        save(step)

    # -- final evaluation, the adapted model (manifest last) and the metrics
    val_after = evaluate()
    log.info("validation after: loss %.4f, perplexity %.2f", val_after["loss"], val_after["perplexity"])
    if main:
        with tempfile.TemporaryDirectory() as local:
            raw.model.save_pretrained(local)
            tokenizer.save_pretrained(local)
            manifest.publish_dir(local, model_url)
        recent = [h[1] for h in state["history"][-cfg.log_every :]]
        storage.write_json(
            storage.join(out, "metrics.json"),
            {
                "model": cfg.model,
                "world_size": world,
                "steps": step,
                "epochs": step / steps_per_epoch,
                "global_batch_blocks": cfg.batch_size,
                "max_length": cfg.max_length,
                "train_blocks": len(blocks),
                "validation_blocks": len(val_blocks),
                "first_step_loss": state["first_step_loss"],
                "train_loss": sum(recent) / len(recent) if recent else None,
                "val_before": state["val_before"],
                "val_after": val_after,
                "tokens_per_s": step * tokens_per_step / state["train_seconds"] if state["train_seconds"] else None,
                "train_seconds": state["train_seconds"],
                "history": state["history"],
            },
        )
        log.info("wrote %s and %s", model_url, storage.join(out, "metrics.json"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _texts(urls: list[str], column: str) -> list[str]:
    """The texts of the CSVs, each distinct note once (MTSamples lists many under two specialties).

    An empty text is refused by row, as in every job: it means the file is not what it should be.
    """
    texts: list[str] = []
    for url in urls:
        df = data.read_table(url, [column])
        data.check_texts(df, url, column)
        texts += df[column].tolist()
    return list(dict.fromkeys(texts))


def _evaluate(model, inputs: torch.Tensor, labels: torch.Tensor, accelerator, micro_batch: int) -> dict:
    """Loss and perplexity on the fixed-mask validation blocks, each rank a strided share of them."""
    raw = accelerator.unwrap_model(model)
    raw.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = np.arange(accelerator.process_index, len(inputs), accelerator.num_processes)
    with torch.no_grad(), accelerator.autocast():
        for begin in range(0, len(mine), micro_batch):
            rows = torch.from_numpy(mine[begin : begin + micro_batch])
            batch_labels = labels[rows].to(accelerator.device)
            totals[0] += raw(inputs[rows].to(accelerator.device), batch_labels).double()
            totals[1] += (batch_labels != IGNORE).sum()
    raw.train()
    loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "masked_tokens": int(count)}


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested spec as flat scalar key/values, which every tracker accepts."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
