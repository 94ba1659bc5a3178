"""The original experiment's masked-LM recipe on Hugging Face `Trainer`, as one process (benchmarks only).

    python benchmarks/trainer_recipe.py --model MODEL --notes notes.csv --out DIR [--batch 4 --max-length 512]

Each note tokenized on its own, truncated and padded to `max_length`, 15% masked by
`DataCollatorForLanguageModeling`, `AutoModelForMaskedLM` trained by `Trainer` for one epoch over
the notes, batch `--batch`, then the model saved. `benchmarks/mlm_job_vs_trainer.py` runs it as a
whole process against `medclf mlm`; it prints `step N/M` after every optimizer step (flushed), so
the caller can time start-up from the output, and the real (non-padding) tokens it trained on.
The product never uses `Trainer`; this file exists to measure against it.
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd
import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class StepLine(TrainerCallback):
    """One flushed line per optimizer step: what the benchmark reads to time start-up."""

    def on_step_end(self, args, state, control, **kwargs):
        print(f"step {state.global_step}/{state.max_steps}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--notes", required=True, help="CSV with a `transcription` column: one note per row")
    parser.add_argument("--out", required=True, help="output folder (the model is saved there)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = pd.read_csv(args.notes)["transcription"].tolist()
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length")
    dataset = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
    real_tokens = sum(sum(mask) for mask in encoded["attention_mask"])
    print(json.dumps({"trainer_notes": len(texts), "trainer_real_tokens": real_tokens}), flush=True)

    model = AutoModelForMaskedLM.from_pretrained(args.model)
    training = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=0.06,  # a float below 1 is a share of the steps (transformers 5)
        logging_steps=10**9,  # the StepLine callback reports steps; no loss .item() per step
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        callbacks=[StepLine()],
    )
    trainer.train()
    trainer.save_model(args.out)
    tokenizer.save_pretrained(args.out)
    print("trainer_recipe: done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
