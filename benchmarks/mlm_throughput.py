"""Masked-LM training throughput: our loop against the stock recipe, same model, data and machine.

    python benchmarks/mlm_throughput.py                       # MiniLM at 512 tokens, a few minutes on 2 cores
    python benchmarks/mlm_throughput.py --model bert-base-uncased --batch 32 --steps 20   # on a GPU node
    python benchmarks/mlm_throughput.py --config bert-base --tokens random --bf16 --batch 32   # benchmarks/gpu.sh

Stock recipe (the original experiment's way): each note tokenized on its own, truncated and padded
to 512, 15% masked by `DataCollatorForLanguageModeling`, `BertForMaskedLM(..., labels=...)` which
projects all 512 positions onto the whole vocabulary. Ours (medclf.mlm): notes packed into full
blocks, seeded masks, only masked positions projected, and `medclf mlm`'s attention dropout
(`mlm.attention_dropout`, default 0: sdpa's fused kernel) where the stock recipe keeps the model's
own (0.1); `--attention-dropout model` gives ours the model's too. Both do forward, backward and an AdamW
step; only real (non-padding) tokens count. Steps alternate (ours, stock, ours, ...) so a noisy
neighbour slows both alike; medians and bests over steps are reported. Also measures this
machine's matmul peak with one large torch matmul, and the share of it our loop reaches in model
FLOPs (MFU; only the FLOPs each loop's algorithm needs for the real tokens count: ours projects
only masked positions onto the vocabulary, the stock recipe all real ones), also against a
nominal peak (`--nominal-peak`, default 989 TFLOP/s: H100/H200 dense bf16).

`--config bert-base` builds a bert-base-sized encoder from `BertConfig()` with random weights (no
download; speed does not depend on the weights). `--tokens random` needs neither tokenizer nor
data: random word pieces of a 30,522-word BERT vocabulary, notes of the real MTSamples lengths
(benchmarks/mtsamples_token_lengths.txt, written by `--write-lengths` from the real data), so
padding and packing cost what they cost on the real notes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import pandas as pd
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    DataCollatorForLanguageModeling,
)

from medclf import models, tokenstore
from medclf.config import MlmSpec
from medclf.masking import IGNORE, Masker, pack
from medclf.mlm import MaskedLM, adamw

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mtsamples.csv.xz"  # shipped
LENGTHS = pathlib.Path(__file__).resolve().parent / "mtsamples_token_lengths.txt"


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
    parser.add_argument(
        "--config",
        choices=["pretrained", "bert-base"],
        default="pretrained",
        help="pretrained: --model's weights; bert-base: BertConfig(), random weights",
    )
    parser.add_argument(
        "--tokens",
        choices=["real", "random"],
        default="real",
        help="real: --data tokenized by --model's tokenizer; random: random ids, real note lengths",
    )
    parser.add_argument("--layers", type=int, default=None, help="with --config bert-base: fewer layers (smoke tests)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    parser.add_argument(
        "--attention-dropout",
        default=str(MlmSpec().attention_dropout),
        help="our loop's attention dropout (default: medclf mlm's); 'model': the model's own, as the stock recipe",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (both loops)")
    parser.add_argument("--profile", action="store_true", help="also print our step's top operators (torch.profiler)")
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring the matmul peak, twice")
    parser.add_argument(
        "--nominal-peak", type=float, default=989e12, help="FLOP/s for the nominal MFU (H100/H200 bf16)"
    )
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    parser.add_argument("--write-lengths", default=None, help="write the real notes' token counts here and stop")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.manual_seed(0)
    if args.write_lengths:
        return write_lengths(args)

    n_notes = args.batch * (args.steps + 1) * 2
    if args.tokens == "real":
        tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model))
        texts = real_texts(args.data)[:n_notes]
        ids_np, starts_np = tokenstore.tokenize(texts, tokenizer)
        ids, starts = torch.from_numpy(ids_np.astype("int64")), torch.from_numpy(starts_np)
        encoded = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length")
    else:
        tokenizer = synthetic_tokenizer()
        ids, starts, encoded = random_notes(tokenizer, n_notes, args.max_length)
    if args.config == "bert-base":
        layers = {"num_hidden_layers": args.layers} if args.layers else {}
        model = AutoModelForMaskedLM.from_config(BertConfig(**layers), attn_implementation=args.attn)
    else:
        model = AutoModelForMaskedLM.from_pretrained(models.resolve(args.model), attn_implementation=args.attn)
    model = model.to(device).train()
    if args.compile:  # in place, so both loops run the compiled encoder; compiling happens in the untimed step
        model.base_model.compile(dynamic=False)
    config = model.config
    # Attention dropout is read from these modules at every forward pass: each loop sets its own.
    attention_dropouts = [
        m.dropout
        for m in model.modules()
        if hasattr(m, "attention_head_size") and isinstance(m.dropout, torch.nn.Dropout)
    ]
    own_dropout = config.attention_probs_dropout_prob
    if not attention_dropouts:
        raise SystemExit(f"mlm_throughput: no attention dropout modules found in {type(model).__name__}")
    ours_dropout = own_dropout if args.attention_dropout == "model" else float(args.attention_dropout)

    def set_attention_dropout(p: float) -> None:
        for module in attention_dropouts:
            module.p = p

    # ours: packed blocks, seeded masks, masked-only projection
    blocks = list(zip(pack(ids, args.max_length), pack(starts, args.max_length), strict=True))  # (ids, starts)
    masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids)
    ours = MaskedLM(model)

    # stock: each note padded/truncated to max_length, the collator's masks, full projection
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    optimizer = adamw(list(model.parameters()), lr=1e-5)  # the same optimizer for both

    def step_ours(k: int) -> tuple[int, int]:
        rows = [(k * args.batch + j) % len(blocks) for j in range(args.batch)]
        inputs, labels = masker.batch(blocks, rows, seed=0, epoch=0)
        masked = int((labels != IGNORE).sum())
        set_attention_dropout(ours_dropout)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = ours(inputs.to(device), labels.to(device)) / masked
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return inputs.numel(), masked

    def step_stock(k: int) -> tuple[int, int]:
        rows = [(k * args.batch + j) % len(encoded["input_ids"]) for j in range(args.batch)]
        batch = collator(
            [{"input_ids": encoded["input_ids"][r], "attention_mask": encoded["attention_mask"][r]} for r in rows]
        )
        batch = {key: value.to(device) for key, value in batch.items()}
        set_attention_dropout(own_dropout)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return int(batch["attention_mask"].sum()), int((batch["labels"] != IGNORE).sum())

    # -- the matmul peak, measured before and after the steps: the higher one is the less disturbed
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_size = 8192 if device == "cuda" else 2048
    peak_before = matmul_peak(peak_size, dtype, device, args.peak_seconds)

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

    peak = max(peak_before, matmul_peak(peak_size, dtype, device, args.peak_seconds))
    if args.profile:
        print_profile(lambda: step_ours(args.steps + 1), device)

    def rate(name: str, index: int) -> tuple[float, float]:
        """Median and best over steps of real tokens/s (index 0) or model FLOP/s (index 2)."""
        rates = [t[index] / t[1] for t in timings[name]]
        return statistics.median(rates), max(rates)

    (ours_tps, ours_best), (stock_tps, stock_best) = rate("ours", 0), rate("stock", 0)
    ours_flops, ours_flops_best = rate("ours", 2)
    stock_flops, _ = rate("stock", 2)
    masks = encoded["attention_mask"]
    fill = sum(sum(m) for m in masks) / (len(masks) * args.max_length)
    figures = {
        "model": "BertConfig() (bert-base, random weights)" if args.config == "bert-base" else args.model,
        "tokens": args.tokens,
        "attention": config._attn_implementation,
        "compiled": args.compile,
        "ours_attention_dropout": ours_dropout,
        "stock_attention_dropout": own_dropout,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
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
        "stock_model_flops_per_s": stock_flops,
        "stock_share_of_matmul_peak": stock_flops / peak,
        "nominal_peak_flops": args.nominal_peak,
        "ours_mfu_nominal": ours_flops / args.nominal_peak,
        "stock_mfu_nominal": stock_flops / args.nominal_peak,
    }
    print(json.dumps(figures, indent=2))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"model FLOP/s {ours_flops / 1e12:.3f} T (stock {stock_flops / 1e12:.3f} T); "
        f"MFU {ours_flops / peak:.1%} of the measured {str(dtype).removeprefix('torch.')} matmul peak "
        f"{peak / 1e12:.3f} T (stock {stock_flops / peak:.1%}), {ours_flops / args.nominal_peak:.2%} of "
        f"{args.nominal_peak / 1e12:.0f} T (stock {stock_flops / args.nominal_peak:.2%}); "
        f"ratio to stock {ours_tps / stock_tps:.2f}× real tokens/s ({figures['device']})"
    )


def print_profile(step, device: str) -> None:
    """Where one of our steps spends its time: the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))


def real_texts(path: str) -> list[str]:
    """The distinct MTSamples transcriptions in file order."""
    texts = [t for t in pd.read_csv(path)["transcription"].dropna().tolist() if t.strip()]
    return list(dict.fromkeys(texts))


def write_lengths(args) -> None:
    """Token counts ([CLS] and [SEP] included, untruncated) of the distinct notes: the random stream's shape."""
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model))
    lengths = [len(ids) for ids in tokenizer(real_texts(args.data), verbose=False)["input_ids"]]
    header = (
        f"# token counts of the {len(lengths)} distinct MTSamples notes in file order ({pathlib.Path(args.model).name})"
    )
    pathlib.Path(args.write_lengths).write_text("\n".join([header, *map(str, lengths)]) + "\n")


def synthetic_tokenizer(vocab_size: int = 30522) -> BertTokenizerFast:
    """A WordPiece tokenizer with bert-base-uncased's special ids and vocabulary size, made offline."""
    words = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})


def random_notes(tokenizer, n_notes: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Notes of the real lengths made of random word pieces: our stream and the stock padded encoding."""
    lengths = [int(line) for line in LENGTHS.read_text().split("\n") if line and not line.startswith("#")]
    generator = torch.Generator().manual_seed(0)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    stream, padded, masks = [], [], []
    for k in range(n_notes):
        body = torch.randint(1000, len(tokenizer), (lengths[k % len(lengths)] - 2,), generator=generator).tolist()
        stream += [cls, *body, sep]
        note = [cls, *body[: max_length - 2], sep]
        padded.append(note + [pad] * (max_length - len(note)))
        masks.append([1] * len(note) + [0] * (max_length - len(note)))
    ids = torch.tensor(stream, dtype=torch.int32)
    return ids, torch.ones_like(ids, dtype=torch.bool), {"input_ids": padded, "attention_mask": masks}


if __name__ == "__main__":
    main()
