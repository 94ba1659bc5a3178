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

import functools
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
from transformers.modeling_utils import PreTrainedModel

from medclf import checkpoint, config, jobrecord, layout, manifest, models, runtime, storage, tokenstore
from medclf.config import RunSpec
from medclf.errors import Diverged, MedclfError, Preempted
from medclf.masking import IGNORE, Masker, Plan, StepBatches, step_loader
from medclf.optim import adamw, decay_groups, warmup_then_decay

log = logging.getLogger(__name__)

# Keys that shape the trajectory: a checkpoint made with other values cannot be continued.
# The optimizer and schedule settings are among them: the restored optimizer would keep the old lr
# and a rebuilt schedule would restart its warm-up. The validation settings change the reported
# before/after figures (val_before is kept in the checkpoint). Not compared: micro_batch_size (and
# the process count), which only split the global batch: each micro-batch's loss is divided by the
# masked tokens of the whole global batch, so the step is the same sum of gradients (up to the
# order of float additions); log_every, eval_every, checkpoint_every, keep_last and report_to,
# which change what is logged or kept, never the weights. The seed and the number of training
# blocks are compared too, and dataset.text_column, saved as `text_column` (see `run_settings`).
RESUME_KEYS = (
    "model",
    "train",
    "extra_text",
    "max_length",
    "mlm_probability",
    "whole_word_masking",
    "attention_dropout",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "max_grad_norm",
    "epochs",
    "max_steps",
    "validation",
    "eval_seed",
    "eval_blocks",
)


class MaskedLM(torch.nn.Module):
    """A masked-LM model whose forward returns the summed loss over masked positions only.

    The stock forward projects every position onto the vocabulary (512 × 30,522 logits per
    block) and then ignores 85% of them; here the encoder's hidden states are gathered at the
    masked positions first and only those go through the model's own prediction head.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head = prediction_head(self.model)
        where = labels != IGNORE
        if head is None:  # an architecture without a known head (DistilBERT): the full projection
            # Summed over the masked positions; 0 (not the NaN of a mean over nothing) when there are none.
            logits = self.model(input_ids=input_ids).logits
            return F.cross_entropy(logits[where].float(), labels[where], reduction="sum")
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


@dataclass
class TrainState(checkpoint.State):
    """What the loop carries from step to step (step, run and world_size: checkpoint.State): the
    schema of a checkpoint's state.json. `run` holds the RESUME_KEYS values the run was made with."""

    history: list = field(default_factory=list)  # [step, loss, lr] of every step
    val_before: Optional[dict] = None
    train_seconds: float = 0.0
    first_step_loss: Optional[float] = None
    epoch: int = 0  # written at save time: where the data order stands (for a reader of state.json)
    blocks_done_in_epoch: int = 0


@dataclass
class Blocks:
    """The packed training blocks, their masker, and the fixed-mask validation batch."""

    tokenizer: Any
    train: tokenstore.StreamBlocks  # block i: (ids, word starts), read from the token store's shards
    masker: Masker
    val_inputs: torch.Tensor
    val_labels: torch.Tensor
    steps_per_epoch: int
    total_steps: int
    tokenize: dict = field(default_factory=dict)  # what tokenizing took in this run (metrics.json)


@dataclass
class Training:
    """The prepared model, optimizer and schedule, and how one global batch is split over ranks."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    accumulation: int
    published_config: dict = field(default_factory=dict)  # config fields the saved model gets back

    @property
    def raw(self) -> MaskedLM:
        return self.accelerator.unwrap_model(self.model)


def run(spec: RunSpec) -> None:
    with runtime.StopSignal() as stop:
        _run(spec, stop)


def _run(spec: RunSpec, stop: runtime.StopSignal) -> None:
    started = time.perf_counter()
    cfg, paths = spec.mlm, layout.Run.of(spec)
    model_path, model_config = check_inputs(spec)
    accelerator, accumulation = start_accelerator(spec)
    record = job_record(spec)
    if jobrecord.up_to_date(record, spec.overwrite, accelerator):
        return
    resume_url = choose_resume(spec, accelerator)
    blocks = load_blocks(spec, model_path, model_config, accelerator, accumulation)
    t = build_training(cfg, model_path, model_config, accelerator, accumulation, blocks.total_steps)
    state = resume(spec, t, blocks, resume_url)
    if cfg.report_to != "none":
        accelerator.init_trackers("medclf-mlm", config=_flat(config.to_dict(spec)))
    if state.val_before is None:
        state.val_before = evaluate(t, blocks, cfg.micro_batch_size)
        log.info("validation before: loss %.4f, perplexity %.2f", *_loss_ppl(state.val_before))
    first_step = train(spec, t, blocks, state, stop, saved_at=state.step if resume_url else None)
    # This run's start-up figures (a resumed run's own): what tokenizing took, and the wait for a first step.
    startup = {"tokenization": blocks.tokenize, "seconds_to_first_step": first_step - started if first_step else None}
    val_after = evaluate(t, blocks, cfg.micro_batch_size)
    log.info("validation after: loss %.4f, perplexity %.2f", *_loss_ppl(val_after))
    if accelerator.is_main_process:
        publish(spec, t, blocks, state, val_after, startup)
        jobrecord.write(record)
        log.info("wrote %s and %s", paths.mlm_model, paths.mlm_metrics)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group, which
        tracker.finish()  # `medclf run`'s next stages still use (the CLI ends it on the way out)


def check_inputs(spec: RunSpec) -> tuple[str, Any]:
    """Everything that can be refused before any heavy work; returns the model folder and its config."""
    cfg, paths = spec.mlm, layout.Run.of(spec)
    storage.check_writable(paths.mlm)
    model_path = models.resolve(cfg.model)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except OSError as e:
        raise MedclfError(f"mlm.model: cannot load {cfg.model!r} ({' '.join(str(e).split())[:200]})") from None
    offset = 2 if model_config.model_type in ("roberta", "xlm-roberta", "camembert") else 0  # RoBERTa skips 2 positions
    limit = model_config.max_position_embeddings - offset
    if cfg.max_length > limit:
        raise MedclfError(f"mlm.max_length: {cfg.max_length} is above what {cfg.model} accepts ({limit} positions)")
    attention_dropout_key(model_config, cfg)
    return model_path, model_config


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT, RoBERTa, ...; DistilBERT


def attention_dropout_key(model_config: Any, cfg: Any) -> Optional[str]:
    """The model config's attention-dropout field that mlm.attention_dropout sets (None: left as it is).

    Why 0 by default: with dropout on the attention probabilities, sdpa on CPU leaves its fused
    kernel for the math path and draws a mask over batch × heads × length² entries; at 512 tokens
    that is 62% of a MiniLM step. On the dev fold, adapting without it was no worse (README)."""
    if cfg.attention_dropout is None:
        return None
    for name in ATTENTION_DROPOUT_KEYS:
        if hasattr(model_config, name):
            return name
    raise MedclfError(
        f"mlm.attention_dropout: {cfg.model} ({model_config.model_type}) has no attention dropout to set "
        f"(none of {', '.join(ATTENTION_DROPOUT_KEYS)}); set it to null"
    )


def job_record(spec: RunSpec) -> jobrecord.Record:
    """What makes the adapted model: the recorded keys, the texts and the starting model. Checkpoints
    without a record are an interrupted run (resume=auto continues it); a model without one is refused."""
    cfg, paths = spec.mlm, layout.Run.of(spec)
    texts = [cfg.train or paths.prepared_train, cfg.validation or paths.prepared_validation, *cfg.extra_text]
    inputs = {jobrecord.shown(paths.out, url): jobrecord.file_fingerprint(url) for url in texts}
    inputs["mlm.model"] = jobrecord.model_fingerprint(cfg.model)
    made = [paths.mlm_model] if manifest.exists(paths.mlm_model) else []  # a half-published model is redone
    return jobrecord.Record("mlm", paths.mlm_record, jobrecord.keys("mlm", spec), inputs, [paths.mlm], made)


def start_accelerator(spec: RunSpec) -> tuple[Any, int]:
    """The accelerator, seeded; the global batch fixes the accumulation, whatever the process count."""
    cfg, paths = spec.mlm, layout.Run.of(spec)
    trackers_dir = None
    if cfg.report_to != "none":  # trackers write local files: next to the outputs, or a temp folder
        local_out = storage.is_local(paths.mlm)
        trackers_dir = storage.local_path(paths.mlm_trackers) if local_out else tempfile.mkdtemp()
    accelerator = runtime.make_accelerator(paths.out, report_to=cfg.report_to, project_dir=trackers_dir)
    world = accelerator.num_processes
    accumulation = runtime.accumulation_steps(cfg.batch_size, cfg.micro_batch_size, world, key="mlm.batch_size")
    accelerator.gradient_accumulation_steps = accumulation
    runtime.seed_everything(spec.seed)
    return accelerator, accumulation


def choose_resume(spec: RunSpec, accelerator: Any) -> Optional[str]:
    """The checkpoint to continue from, or None (mlm.resume; overwrite=true starts over)."""
    paths = layout.Run.of(spec)
    return checkpoint.choose(spec.mlm.resume, paths.mlm_checkpoints, spec.overwrite, accelerator, paths.mlm)


def load_blocks(spec: RunSpec, model_path: str, model_config: Any, accelerator: Any, accumulation: int) -> Blocks:
    """The token stores of the training and validation text (built by every process together, or found
    complete), the training blocks read from them, and the fixed-mask validation batch."""
    cfg, paths = spec.mlm, layout.Run.of(spec)
    train_urls, validation_url = tokenstore.inputs(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    build = functools.partial(
        tokenstore.build,
        column=spec.dataset.text_column,
        tokenizer=tokenizer,
        cache=paths.cache,
        shard_rows=cfg.shard_rows,
    )
    train_store = build(train_urls, accelerator=accelerator, what="training text")
    val_store = build([validation_url], accelerator=accelerator, what="validation text")
    blocks = tokenstore.StreamBlocks(train_store.stream, cfg.max_length)
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
    val_blocks = tokenstore.StreamBlocks(val_store.stream, cfg.max_length)
    n_val = min(len(val_blocks), cfg.eval_blocks if cfg.eval_blocks is not None else len(val_blocks))
    if n_val == 0:
        raise MedclfError(f"{validation_url}: too little text for one block of mlm.max_length={cfg.max_length} tokens")
    val_inputs, val_labels = masker.batch(val_blocks, range(n_val), cfg.eval_seed, epoch=-1)
    log.info(
        "train: %d blocks of %d tokens, %d steps/epoch, %d steps; validation: %d blocks; "
        "%d process(es) × %d micro-batches",
        len(blocks),
        cfg.max_length,
        steps_per_epoch,
        total_steps,
        n_val,
        accelerator.num_processes,
        accumulation,
    )
    tokenized = train_store.tokens_built + val_store.tokens_built
    seconds = train_store.seconds + val_store.seconds
    timing = {"tokens": tokenized, "seconds": seconds, "tokens_per_s": tokenized / seconds if tokenized else None}
    return Blocks(tokenizer, blocks, masker, val_inputs, val_labels, steps_per_epoch, total_steps, timing)


def build_training(
    cfg: Any, model_path: str, model_config: Any, accelerator: Any, accumulation: int, total_steps: int
) -> Training:
    """The model (a checkpoint without masked-LM head weights, like MiniLM, gets a fresh head; attention
    dropout as mlm.attention_dropout says), AdamW without decay on biases and LayerNorm weights (the
    1-d parameters), and the schedule."""
    key = attention_dropout_key(model_config, cfg)
    override = {key: cfg.attention_dropout} if key else {}
    hf_model, loading = AutoModelForMaskedLM.from_pretrained(model_path, output_loading_info=True, **override)
    if loading["missing_keys"]:
        log.warning(
            "%s has no masked-LM head weights; initialised %d tensors (%s)",
            cfg.model,
            len(loading["missing_keys"]),
            ", ".join(sorted(loading["missing_keys"])[:4]),
        )
    model = MaskedLM(hf_model)
    optimizer = adamw(decay_groups(model.parameters(), cfg.weight_decay), lr=cfg.lr)
    scheduler = warmup_then_decay(optimizer, cfg.warmup_ratio, total_steps)
    # The scheduler stays unprepared: Accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    # The published model keeps the checkpoint's own setting: a training choice of the adaptation
    # must not change how the adapted encoder is fine-tuned later.
    published_config = {key: getattr(model_config, key)} if key else {}
    return Training(accelerator, model, optimizer, scheduler, accumulation, published_config)


def resume(spec: RunSpec, t: Training, blocks: Blocks, resume_url: Optional[str]) -> TrainState:
    """A fresh state, or weights, optimizer, scheduler, every rank's RNG and the position in the data
    restored from `resume_url`, refused when it was made with settings that shape the trajectory."""
    run_keys = run_settings(spec, blocks)
    if not resume_url:
        return TrainState(run=run_keys)
    saved = checkpoint.resume(
        resume_url, t.accelerator, model=t.raw.model, optimizer=t.optimizer, scheduler=t.scheduler, run=run_keys
    )
    state = TrainState.from_json(saved)
    log.info("resumed from %s at step %d (epoch %d)", resume_url, state.step, state.step // blocks.steps_per_epoch)
    return state


def run_settings(spec: RunSpec, blocks: Blocks) -> dict:
    """The values of everything that shapes the trajectory, as a checkpoint records them."""
    settings = {k: getattr(spec.mlm, k) for k in RESUME_KEYS} | {"text_column": spec.dataset.text_column}
    return settings | {"seed": spec.seed, "train_blocks": len(blocks.train)}


def train(
    spec: RunSpec, t: Training, blocks: Blocks, state: TrainState, stop: runtime.StopSignal, saved_at: Optional[int]
) -> Optional[float]:
    """One global batch per step until total_steps; checkpoints on schedule, and stops (all ranks
    agree) after a SIGTERM/SIGUSR1 with a checkpoint of the step reached. DataLoader workers mask the
    batches ahead of the steps that use them. Returns when (perf_counter) the first step was done."""
    cfg, accelerator, total_steps = spec.mlm, t.accelerator, blocks.total_steps
    progress = runtime.Progress(accelerator, total_steps, start=state.step, desc="mlm", unit="tokens")
    step_sleep = runtime.step_sleep()
    plan = Plan(
        spec.seed,
        cfg.batch_size,
        cfg.micro_batch_size,
        blocks.steps_per_epoch,
        accelerator.num_processes,
        accelerator.process_index,
    )
    step_batches = StepBatches(blocks.train, blocks.masker, plan, state.step, total_steps)
    first_step_at = None
    t.model.train()
    with step_loader(step_batches, cfg.loader_workers, accelerator.device.type == "cuda") as batches:
        started = time.perf_counter()  # a step's time includes its wait for the batch: a starved step is slow
        for batch in batches:
            step_loss, lr = train_step(t, batch, cfg, state.step)
            state.step += 1
            state.train_seconds += time.perf_counter() - started
            first_step_at = first_step_at or time.perf_counter()
            if state.first_step_loss is None:
                state.first_step_loss = step_loss
            log_step(t, blocks, cfg, state, progress, step_loss, lr)
            if step_sleep:
                time.sleep(step_sleep)
            if state.step % cfg.checkpoint_every == 0 or state.step == total_steps:
                save(spec, t, blocks, state)
                saved_at = state.step
            if state.step < total_steps and stop.requested(accelerator):
                url = save(spec, t, blocks, state) if saved_at != state.step else None
                url = url or checkpoint.step_url(layout.Run.of(spec).mlm_checkpoints, state.step)
                progress.close()
                raise Preempted(f"stopped at step {state.step}/{total_steps}; checkpoint {url}")
            started = time.perf_counter()
    progress.close()
    if saved_at != state.step:  # resumed from the final checkpoint: make sure it is there
        save(spec, t, blocks, state)
    return first_step_at


def train_step(t: Training, batch: tuple[torch.Tensor, torch.Tensor, int], cfg: Any, step: int) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches of global batch `step` (its rows of the
    batch and their masked-token count), then one optimizer and scheduler step; returns the batch's
    loss per masked token (all ranks) and the lr used."""
    accelerator, world = t.accelerator, t.accelerator.num_processes
    inputs, labels, masked_here = batch
    masked = masked_here
    if world > 1:  # the whole global batch's count: one small reduction, not every rank masking every row
        count = torch.tensor([masked_here], dtype=torch.int64, device=accelerator.device)
        masked = int(accelerator.reduce(count, reduction="sum").item())
    masked = max(masked, 1)
    # DDP averages gradients over ranks and backward() divides by the accumulation: undo both,
    # so the gradient is the global batch's mean loss over its masked tokens.
    scale = world * t.accumulation / masked
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    global_loss = 0.0
    for micro in range(t.accumulation):
        rows = slice(micro * cfg.micro_batch_size, (micro + 1) * cfg.micro_batch_size)
        with accelerator.accumulate(t.model):
            loss = t.model(inputs[rows].to(accelerator.device), labels[rows].to(accelerator.device))
            accelerator.backward(loss * scale)
            loss_sum += loss.detach().double()
            if accelerator.sync_gradients:  # the last micro-batch: check, clip, then step
                global_loss = check_finite(t, cfg, loss_sum, step + 1)
            t.optimizer.step()
            # Zeroed in place, not freed: a freed 30k-word embedding gradient (47 MB in MiniLM) is
            # above glibc's mmap threshold, so every step would map and fault it in afresh.
            t.optimizer.zero_grad(set_to_none=False)
    lr = t.scheduler.get_last_lr()[0]
    t.scheduler.step()
    return global_loss / masked, lr


def check_finite(t: Training, cfg: Any, loss_sum: torch.Tensor, step: int) -> float:
    """The global batch's summed loss, once every rank agrees it (and the clipped gradient's norm)
    is finite; else Diverged, before the optimizer step, so no non-finite weight is ever saved.

    One reduction per optimizer step carries both the loss and a not-finite flag, so the ranks
    agree without a host sync per micro-batch."""
    accelerator = t.accelerator
    bad = ~torch.isfinite(loss_sum)
    if cfg.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
        # fp16's loss scaler expects an inf gradient now and then: it skips that step and rescales.
        if norm is not None and accelerator.mixed_precision != "fp16":
            bad = bad | ~torch.isfinite(torch.as_tensor(norm, device=loss_sum.device))
    both = torch.stack([torch.where(bad, torch.zeros_like(loss_sum), loss_sum), bad.double()])
    total, flagged = accelerator.reduce(both, reduction="sum").tolist()
    if flagged:
        raise Diverged(
            f"mlm: step {step}: the loss or gradient is not finite (NaN/inf) on {int(flagged)} process(es); "
            f"stopped before the optimizer step, nothing of step {step} saved, `latest` still names the last "
            "good checkpoint; lower mlm.lr or raise mlm.warmup_ratio, then resume"
        )
    return total


def log_step(
    t: Training, blocks: Blocks, cfg: Any, state: TrainState, progress: runtime.Progress, loss: float, lr: float
) -> None:
    """Progress bar, history, the log line every log_every steps, and validation every eval_every."""
    step, total_steps = state.step, blocks.total_steps
    progress.update(cfg.batch_size * cfg.max_length, loss=loss, lr=lr)
    state.history.append([step, loss, lr])
    if step % cfg.log_every == 0 or step == total_steps:
        progress.log(loss=loss, lr=lr)
        t.accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": progress.last_rate}, step=step)
    if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
        val = evaluate(t, blocks, cfg.micro_batch_size)
        progress.log(val_loss=val["loss"], val_perplexity=val["perplexity"])
        t.accelerator.log({"val/loss": val["loss"], "val/perplexity": val["perplexity"]}, step=step)


def save(spec: RunSpec, t: Training, blocks: Blocks, state: TrainState) -> str:
    """A checkpoint of the step reached (every rank calls this); returns its URL."""
    state.epoch, position = divmod(state.step, blocks.steps_per_epoch)
    state.blocks_done_in_epoch = position * spec.mlm.batch_size
    state.world_size = t.accelerator.num_processes
    return checkpoint.save(
        layout.Run.of(spec).mlm_checkpoints,
        state.step,
        t.accelerator,
        model=t.raw.model,
        optimizer=t.optimizer,
        scheduler=t.scheduler,
        spec_yaml=config.to_yaml(spec),
        state=asdict(state),
        keep_last=spec.mlm.keep_last,
    )


def publish(spec: RunSpec, t: Training, blocks: Blocks, state: TrainState, val_after: dict, startup: dict) -> None:
    """The adapted model (save_pretrained, manifest last) and metrics.json; main process only."""
    cfg, paths = spec.mlm, layout.Run.of(spec)
    t.raw.model.config.update(t.published_config)  # the modules keep the values they were built with
    with tempfile.TemporaryDirectory() as local:
        t.raw.model.save_pretrained(local)
        blocks.tokenizer.save_pretrained(local)
        manifest.publish_dir(local, paths.mlm_model)
    recent = [h[1] for h in state.history[-cfg.log_every :]]
    tokens = state.step * cfg.batch_size * cfg.max_length
    storage.write_json(
        paths.mlm_metrics,
        {
            "model": cfg.model,
            "world_size": t.accelerator.num_processes,
            "steps": state.step,
            "epochs": state.step / blocks.steps_per_epoch,
            "global_batch_blocks": cfg.batch_size,
            "max_length": cfg.max_length,
            "train_blocks": len(blocks.train),
            "validation_blocks": len(blocks.val_inputs),
            "first_step_loss": state.first_step_loss,
            "train_loss": sum(recent) / len(recent) if recent else None,
            "val_before": state.val_before,
            "val_after": val_after,
            "tokens_per_s": tokens / state.train_seconds if state.train_seconds else None,
            "train_seconds": state.train_seconds,
            **startup,
            "history": state.history,
        },
    )


def _loss_ppl(val: dict) -> tuple[float, float]:
    return val["loss"], val["perplexity"]


def evaluate(t: Training, blocks: Blocks, micro_batch: int) -> dict:
    """Loss and perplexity on the fixed-mask validation blocks, each rank a strided share of them."""
    accelerator, raw = t.accelerator, t.raw
    inputs, labels = blocks.val_inputs, blocks.val_labels
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
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
