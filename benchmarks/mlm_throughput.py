"""Masked-LM training throughput: our loop against the stock recipe, same model, data and machine.

    python benchmarks/mlm_throughput.py                       # MiniLM at 512 tokens, a few minutes on 2 cores
    python benchmarks/mlm_throughput.py --model bert-base-uncased --batch 32 --steps 20   # on a GPU node

Stock recipe (the original experiment's way): each note tokenized on its own, truncated and padded
to 512, 15% masked by `DataCollatorForLanguageModeling`, `BertForMaskedLM(..., labels=...)` which
projects all 512 positions onto the whole vocabulary. Ours (medclf.mlm): notes packed into full
blocks, seeded masks, only masked positions projected. Both do forward, backward and an AdamW
step; only real (non-padding) tokens count. Steps alternate (ours, stock, ours, ...) so a noisy
neighbour slows both alike; medians and bests over steps are reported. Also measures this
machine's matmul peak with one large torch matmul, and the share of it our loop reaches in model
FLOPs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import pandas as pd
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

from medclf import models
from medclf.masking import IGNORE, Masker, pack, token_stream
from medclf.mlm import MaskedLM, adamw

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mtsamples.csv.xz"  # shipped


def matmul_peak(n: int, dtype: torch.dtype, device: str, seconds: float = 3.0) -> float:
    """FLOP/s of repeated n×n matmuls: the most this machine's BLAS gives a training step."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - started))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_flops(config, tokens: int, masked: int, length: int, project_all: bool) -> float:
    """Training FLOPs (forward + backward = 3 × 2 FLOPs per multiply-add) of encoder, head and vocabulary projection."""
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_token = layers * (4 * h * h + 2 * h * i + 2 * length * h)  # projections, FFN, attention scores+context
    head_tokens = tokens if project_all else masked
    return 3 * 2 * (tokens * per_token + head_tokens * (h * h + h * vocab))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="blocks (ours) or notes (stock) per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each loop")
    parser.add_argument("--bf16", action="store_true", help="autocast bf16 (GPUs)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model))
    texts = [t for t in pd.read_csv(args.data)["transcription"].dropna().tolist() if t.strip()]
    texts = list(dict.fromkeys(texts))[: args.batch * (args.steps + 1) * 2]
    model = AutoModelForMaskedLM.from_pretrained(models.resolve(args.model)).to(device).train()
    config = model.config

    # ours: packed blocks, seeded masks, masked-only projection
    ids, starts = token_stream(texts, tokenizer, "memory://benchmark-cache")
    blocks, block_starts = pack(ids, args.max_length), pack(starts, args.max_length)
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids)
    ours = MaskedLM(model)

    # stock: each note padded/truncated to max_length, the collator's masks, full projection
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length")
    optimizer = adamw(list(model.parameters()), lr=1e-5)  # the same optimizer for both

    def step_ours(k: int) -> tuple[int, int]:
        rows = [(k * args.batch + j) % len(blocks) for j in range(args.batch)]
        inputs, labels = masker.batch(blocks, block_starts, rows, seed=0, epoch=0)
        masked = int((labels != IGNORE).sum())
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = ours(inputs.to(device), labels.to(device)) / masked
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return inputs.numel(), masked

    def step_stock(k: int) -> tuple[int, int]:
        rows = [(k * args.batch + j) % len(texts) for j in range(args.batch)]
        batch = collator(
            [{"input_ids": encoded["input_ids"][r], "attention_mask": encoded["attention_mask"][r]} for r in rows]
        )
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return int(batch["attention_mask"].sum()), int((batch["labels"] != IGNORE).sum())

    # -- the matmul peak, measured before and after the steps: the higher one is the less disturbed
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_size = 4096 if device == "cuda" else 2048
    peak_before = matmul_peak(peak_size, dtype, device)

    # -- alternate single steps (ours, stock, ours, ...) so load from neighbours hits both alike;
    #    one untimed step of each first warms the allocator and caches
    step_ours(0), step_stock(0)
    timings = {"ours": [], "stock": []}  # (real tokens, seconds, model FLOPs) per step
    for k in range(1, args.steps + 1):
        for name, step in (("ours", step_ours), ("stock", step_stock)):
            _sync(device)
            started = time.perf_counter()
            tokens, masked = step(k)
            _sync(device)
            seconds = time.perf_counter() - started
            flops = train_flops(config, tokens, masked, args.max_length, project_all=name == "stock")
            timings[name].append((tokens, seconds, flops))
            print(f"step {k} {name}: {tokens / seconds:,.0f} real tokens/s", flush=True)

    peak = max(peak_before, matmul_peak(peak_size, dtype, device))

    def rate(name: str, index: int) -> tuple[float, float]:
        """Median and best over steps of real tokens/s (index 0) or model FLOP/s (index 2)."""
        rates = [t[index] / t[1] for t in timings[name]]
        return statistics.median(rates), max(rates)

    (ours_tps, ours_best), (stock_tps, stock_best) = rate("ours", 0), rate("stock", 0)
    ours_flops, ours_flops_best = rate("ours", 2)
    fill = sum(sum(m) for m in encoded["attention_mask"]) / (len(texts) * args.max_length)
    figures = {
        "model": args.model,
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "max_length": args.max_length,
        "batch": args.batch,
        "ours_tokens_per_s": ours_tps,
        "stock_real_tokens_per_s": stock_tps,
        "ratio": ours_tps / stock_tps,
        "ours_tokens_per_s_best": ours_best,
        "stock_real_tokens_per_s_best": stock_best,
        "ratio_best": ours_best / stock_best,
        "stock_padding_fill": fill,
        "matmul_peak_flops": peak,
        "ours_model_flops_per_s": ours_flops,
        "share_of_matmul_peak": ours_flops / peak,
        "share_of_matmul_peak_best": ours_flops_best / peak,
    }
    print(json.dumps(figures, indent=2))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
