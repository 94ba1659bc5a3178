"""The whole `medclf mlm` process against the original recipe on `transformers.Trainer`, as a user sees them.

    python benchmarks/mlm_job_vs_trainer.py                         # 256 train notes, MiniLM, 512 tokens, batch 4
    python benchmarks/mlm_job_vs_trainer.py --allocator all         # glibc default, GLIBC_TUNABLES, tcmalloc
    python benchmarks/mlm_job_vs_trainer.py --notes 8 --max-length 128 --eval-blocks 2   # smoke test

The raw data goes through `medclf prepare` (the real grouped train split); the first `--notes`
distinct train notes are the data of both processes. The Trainer recipe
(benchmarks/trainer_recipe.py) pads each note to `--max-length` and masks it with
`DataCollatorForLanguageModeling`, batch `--batch`, one epoch; `medclf mlm` packs the same notes
into blocks of `--max-length` with `--batch` blocks a step, for as many steps as carry the same
count of real (non-padding) tokens as the recipe's epoch. Each is one process, timed by wall
clock from its start to its exit (imports, loading, tokenizing, validation before and after and
saving included), so real tokens/s is what a user gets. Start-up is read from the output: each
process prints a line per optimizer step, and the time to the first one less one steady step is
the start-up; it should be under 10% of the run for the figures to mean steady training.

Each allocator's round also runs the model-step benchmark (benchmarks/mlm_throughput.py, same model,
length and batch) just before the jobs, for the loop's share of the step: the job's steady real
tokens/s (its step lines after the first; and the median of its logged per-step rates) over the
step's.

medclf runs twice: as it comes (`mlm.attention_dropout` 0, chosen on a dev fold: README), and with
the model's own attention dropout (0.1), as the recipe has it; both ratios are reported.

`--allocator` runs every pair with each malloc: glibc's default, GLIBC_TUNABLES (what
`medclf.launch` sets for CPU runs), tcmalloc preloaded (Debian libgoogle-perftools4), and reports
each allocator's ratio in one run. Prints the figures as JSON, then one summary line.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd
import yaml
from transformers import AutoTokenizer

from medclf import models
from medclf.launch import CPU_MALLOC_TUNABLES as TUNABLES  # what CPU runs get from medclf.launch

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "mtsamples.csv.xz"  # shipped
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"
ALLOCATORS = ("default", "tunables", "tcmalloc")
PROGRAMS = ("medclf", "medclf-model-dropout", "trainer")  # run in this order, interleaved per allocator
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")
LOGGED_RATE = re.compile(r"\bstep \d+/\d+ .*? tokens/s ([\d.]+)")  # medclf's log lines (their own window)


def default_model() -> str:
    """all-MiniLM-L6-v2: the installed package folder medclf.models resolves the name to."""
    return models.resolve("all-MiniLM-L6-v2")


def warm_caches(model: str) -> None:
    """Read the model's files and import the libraries once, untimed: no timed process pays for a cold disk."""
    for path in pathlib.Path(model).glob("*"):
        if path.is_file():
            path.read_bytes()
    subprocess.run(
        [sys.executable, "-c", "import medclf.mlm, transformers.trainer"], env=allocator_env("default"), check=True
    )


def allocator_env(name: str) -> dict[str, str]:
    """The child's environment: this one without any malloc setting, plus the allocator's."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    if name == "tunables":
        env["GLIBC_TUNABLES"] = TUNABLES
    elif name == "tcmalloc":
        env["LD_PRELOAD"] = TCMALLOC
    return env


def run_timed(cmd: list[str], env: dict[str, str], log_path: pathlib.Path, timeout: float) -> dict:
    """Run one process; wall seconds from start to exit and the time each `step N/M` line arrived."""
    step_times: dict[int, float] = {}
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)

    def read() -> None:
        pending = b""
        with open(log_path, "wb") as log:
            while chunk := os.read(process.stdout.fileno(), 65536):
                now = time.perf_counter() - started
                log.write(chunk)
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)
                for line in lines:
                    match = STEP_LINE.search(line.decode("utf-8", "replace"))
                    if match:
                        step_times.setdefault(int(match.group(1)), now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        sys.exit(f"mlm_job_vs_trainer: {' '.join(cmd[:4])} ran past {timeout:.0f} s; its output is in {log_path}")
    wall = time.perf_counter() - started
    reader.join()
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        sys.exit(f"mlm_job_vs_trainer: {' '.join(cmd[:4])} exited {rc}; its output ({log_path}) ends:\n{tail}")
    return {"wall_s": wall, "step_times": step_times}


def timing(run: dict, steps: int, real_tokens: int) -> dict:
    """Throughput as seen by a user, and the start-up share, from one process's wall time and step lines."""
    times = run["step_times"]
    missing = [s for s in range(1, steps + 1) if s not in times]
    if missing:
        sys.exit(f"mlm_job_vs_trainer: no `step N/{steps}` line for steps {missing[:5]} (log_every must be 1)")
    intervals = [times[s] - times[s - 1] for s in range(2, steps + 1)]
    step_s = statistics.median(intervals) if intervals else 0.0
    startup = times[1] - step_s  # the first step's line less one steady step: everything before training
    steady = real_tokens * (steps - 1) / steps / (times[steps] - times[1]) if steps > 1 else None
    return {
        "steps": steps,
        "real_tokens": real_tokens,
        "wall_s": round(run["wall_s"], 2),
        "real_tokens_per_s": real_tokens / run["wall_s"],
        "steady_real_tokens_per_s": steady,
        "first_step_line_s": round(times[1], 2),
        "median_step_s": round(step_s, 3),
        "startup_s": round(startup, 2),
        "tail_s": round(run["wall_s"] - times[steps], 2),
        "startup_share": startup / run["wall_s"],
        "startup_under_10pct": startup / run["wall_s"] < 0.10,
        "outside_training_share": (startup + run["wall_s"] - times[steps]) / run["wall_s"],  # start-up + tail
    }


def prepare_notes(args, work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """`medclf prepare` on the raw data; the first `--notes` distinct train notes as notes.csv."""
    data = pathlib.Path(args.data)
    if data.suffix == ".xz":
        raw = work / data.with_suffix("").name
        with lzma.open(data) as src, open(raw, "wb") as dst:
            shutil.copyfileobj(src, dst)
        data = raw
    spec = work / "prepare.yaml"
    spec.write_text(yaml.safe_dump({"out": str(work / "run"), "seed": 42, "prepare": {"input": str(data)}}))
    subprocess.run(
        [sys.executable, "-m", "medclf", "prepare", str(spec)], env=allocator_env("default"), cwd=REPO, check=True
    )
    prepared = work / "run" / "prepare"
    texts = list(dict.fromkeys(pd.read_csv(prepared / "train.csv", dtype=str)["transcription"].tolist()))
    if len(texts) < args.notes:
        sys.exit(f"mlm_job_vs_trainer: --notes {args.notes}, but the train split has {len(texts)} distinct notes")
    notes = work / "notes.csv"
    pd.DataFrame({"transcription": texts[: args.notes]}).to_csv(notes, index=False)
    return notes, prepared / "validation.csv", texts[: args.notes]


def token_budget(args, texts: list[str]) -> tuple[int, int]:
    """The recipe's real tokens (each note truncated to max_length) and medclf steps carrying as many."""
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]  # with [CLS] and [SEP]
    trainer_tokens = sum(min(n, args.max_length) for n in lengths)
    per_step = args.batch * args.max_length
    steps = max(1, round(trainer_tokens / per_step))
    available = sum(lengths) // per_step  # medclf packs the untruncated notes: more tokens per note
    if steps > available:
        sys.exit(f"mlm_job_vs_trainer: {steps} medclf steps needed but the notes fill only {available}")
    return trainer_tokens, steps


def commands(args, work, notes, validation, steps, tag) -> dict[str, list[str]]:
    mlm = {
        "model": args.model,
        "train": str(notes),
        "validation": str(validation),
        "max_length": args.max_length,
        "batch_size": args.batch,
        "micro_batch_size": args.batch,
        "max_steps": steps,
        "lr": 5e-5,
        "log_every": 1,  # a line per step: start-up is read from the first one
        "checkpoint_every": steps,  # one checkpoint, at the end
        "eval_blocks": args.eval_blocks,
    }
    programs = {}
    # medclf as it comes (attention dropout 0), and with the model's own attention dropout, as the recipe
    for program, extra in (("medclf", {}), ("medclf-model-dropout", {"attention_dropout": None})):
        out, spec = work / f"{program}-{tag}", work / f"{program}-{tag}.yaml"
        spec.write_text(yaml.safe_dump({"out": str(out), "seed": 42, "overwrite": True, "mlm": mlm | extra}))
        programs[program] = [sys.executable, "-m", "medclf", "mlm", str(spec)]
    recipe = REPO / "benchmarks" / "trainer_recipe.py"
    trainer_out = work / f"trainer-{tag}"
    return programs | {
        "trainer": [
            sys.executable,
            str(recipe),
            "--model",
            args.model,
            "--notes",
            str(notes),
            "--out",
            str(trainer_out),
        ]
        + ["--batch", str(args.batch), "--max-length", str(args.max_length)],
    }


def model_step(args, work: pathlib.Path, tag: str, env: dict[str, str]) -> float:
    """Our model step's real tokens/s (medclf mlm's attention dropout), from benchmarks/mlm_throughput.py."""
    output = work / f"model-step-{tag}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "mlm_throughput.py"), "--model", args.model]
    cmd += ["--max-length", str(args.max_length), "--batch", str(args.batch), "--steps", str(args.step_steps)]
    with open(work / f"model-step-{tag}.log", "wb") as log:
        subprocess.run(
            cmd + ["--output", str(output)], env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO
        )
    return json.loads(output.read_text())["ours_tokens_per_s"]


def chosen_allocators(value: str) -> tuple[list[str], list[str]]:
    names = list(ALLOCATORS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALLOCATORS]
    if unknown:
        sys.exit(f"mlm_job_vs_trainer: --allocator: unknown {unknown}; choose from {', '.join(ALLOCATORS)} or all")
    skipped = []
    if "tcmalloc" in names and not os.path.exists(TCMALLOC):
        if value != "all":
            sys.exit(
                f"mlm_job_vs_trainer: --allocator tcmalloc: {TCMALLOC} missing (apt-get install libgoogle-perftools4)"
            )
        names.remove("tcmalloc")
        skipped.append(f"tcmalloc: {TCMALLOC} missing")
    return names, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="raw MTSamples CSV (or .csv.xz)")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--notes", type=int, default=256, help="distinct train notes (the recipe's epoch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="notes (recipe) or blocks (medclf) per step")
    parser.add_argument("--eval-blocks", type=int, default=8, help="medclf's validation blocks, before and after")
    parser.add_argument("--allocator", default="default", help="default, tunables, tcmalloc (comma list) or all")
    parser.add_argument("--step-steps", type=int, default=6, help="timed steps of the model-step benchmark")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each process per allocator (median kept)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds allowed to each process")
    parser.add_argument("--workdir", default=None, help="keep runs and logs here (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="also write the JSON figures here")
    args = parser.parse_args()
    args.model = args.model or default_model()
    allocators, skipped = chosen_allocators(args.allocator)

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="mlm-job-vs-trainer-"))
    work.mkdir(parents=True, exist_ok=True)
    notes, validation, texts = prepare_notes(args, work)
    trainer_tokens, steps = token_budget(args, texts)
    warm_caches(args.model)
    trainer_steps = -(-len(texts) // args.batch)
    medclf_tokens = steps * args.batch * args.max_length

    # Interleaved (medclf, recipe) pairs per allocator, so a noisy neighbour slows both alike.
    runs: dict[str, dict[str, list[dict]]] = {a: {p: [] for p in PROGRAMS} for a in allocators}
    model_steps: dict[str, list[float]] = {a: [] for a in allocators}
    for repeat in range(args.repeats):
        for allocator in allocators:
            tag = f"{allocator}-{repeat}"
            cmds = commands(args, work, notes, validation, steps, tag)
            print(f"running the model step ({allocator}, {repeat + 1}/{args.repeats})", file=sys.stderr, flush=True)
            model_steps[allocator].append(model_step(args, work, tag, allocator_env(allocator)))
            for program in PROGRAMS:
                n_steps, tokens = (trainer_steps, trainer_tokens) if program == "trainer" else (steps, medclf_tokens)
                log_path = work / f"{program}-{tag}.log"
                print(f"running {program} ({allocator}, {repeat + 1}/{args.repeats})", file=sys.stderr, flush=True)
                figures = timing(
                    run_timed(cmds[program], allocator_env(allocator), log_path, args.timeout), n_steps, tokens
                )
                if program != "trainer":
                    metrics = json.loads((work / f"{program}-{tag}" / "mlm" / "metrics.json").read_text())
                    figures["run_average_tokens_per_s"] = metrics["tokens_per_s"]  # first step included
                    logged = [float(r) for r in LOGGED_RATE.findall(log_path.read_text(errors="replace"))][1:]
                    figures["logged_median_tokens_per_s"] = statistics.median(logged) if logged else None
                figures["log"] = str(log_path)
                runs[allocator][program].append(figures)

    def median_run(allocator: str, program: str) -> dict:
        chosen = sorted(runs[allocator][program], key=lambda r: r["real_tokens_per_s"])
        return chosen[len(chosen) // 2]

    per_allocator = {}
    for allocator in allocators:
        chosen = {p: median_run(allocator, p) for p in PROGRAMS}
        stock = chosen["trainer"]["real_tokens_per_s"]
        step = statistics.median(model_steps[allocator])
        job = chosen["medclf"]
        per_allocator[allocator] = chosen | {
            "ratio": job["real_tokens_per_s"] / stock,
            "ratio_model_dropout": chosen["medclf-model-dropout"]["real_tokens_per_s"] / stock,
            "model_step_tokens_per_s": step,
            "loop_vs_step": job["steady_real_tokens_per_s"] / step,
            "logged_loop_vs_step": job["logged_median_tokens_per_s"] / step
            if job["logged_median_tokens_per_s"]
            else None,
        }
    if "default" in per_allocator:
        base = per_allocator["default"]
        for pair in per_allocator.values():
            pair["vs_default"] = {p: pair[p]["real_tokens_per_s"] / base[p]["real_tokens_per_s"] for p in PROGRAMS}
    result = {
        "benchmark": "mlm_job_vs_trainer",
        "data": args.data,
        "model": args.model,
        "notes": len(texts),
        "max_length": args.max_length,
        "batch": args.batch,
        "eval_blocks": args.eval_blocks,
        "medclf_steps": steps,
        "trainer_steps": trainer_steps,
        "medclf_real_tokens": medclf_tokens,
        "trainer_real_tokens": trainer_tokens,
        "repeats": args.repeats,
        "allocators": per_allocator,
        "skipped": skipped,
        "workdir": str(work),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    print(summary(result))


def summary(result: dict) -> str:
    parts = []
    for allocator, r in result["allocators"].items():
        ours, stock = r["medclf"], r["trainer"]
        effect = ""
        if "vs_default" in r and allocator != "default":
            effect = f" (medclf {r['vs_default']['medclf']:.2f}×, Trainer {r['vs_default']['trainer']:.2f}× default)"
        same = r["medclf-model-dropout"]
        parts.append(
            f"{allocator}: medclf {ours['real_tokens_per_s']:.0f} vs Trainer {stock['real_tokens_per_s']:.0f} "
            f"real tokens/s = {r['ratio']:.2f}× (with the model's attention dropout, as the recipe: "
            f"{same['real_tokens_per_s']:.0f} = {r['ratio_model_dropout']:.2f}×){effect}, "
            f"start-up {ours['startup_s']:.1f} s ({ours['startup_share']:.0%}) / "
            f"{stock['startup_s']:.1f} s ({stock['startup_share']:.0%}); "
            f"loop vs model step {r['loop_vs_step']:.0%} ({ours['steady_real_tokens_per_s']:.0f} vs "
            f"{r['model_step_tokens_per_s']:.0f})"
        )
    return (
        f"whole job, {result['notes']} notes at {result['max_length']} tokens, batch {result['batch']}, "
        f"{result['medclf_real_tokens']} vs {result['trainer_real_tokens']} real tokens: " + "; ".join(parts)
    )


if __name__ == "__main__":
    main()
