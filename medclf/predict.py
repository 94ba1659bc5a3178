"""The predict job: classify new notes in batch, rows written in input order.

    medclf predict --model s3://bucket/run/head-adapted/model --input s3://bucket/new.csv --output s3://bucket/pred.csv
    accelerate launch -m medclf predict --model URL --input URL --output URL

The input is read predict.chunk_rows rows at a time, so memory stays bounded however long the
file is. Each chunk is encoded like the head's features (distinct texts once, length-sorted
batches with dynamic padding, dealt across processes and gathered); the main process appends
the chunk's rows to the output, which appears complete at the end or not at all. Columns: `row`
(0-based input row), the input's other columns except the text, `prob_<class>` per class, and
`predicted_specialty` (the predicted class, whatever the labels are). The text is read from the
column dataset.text_column (bare `--text_column NAME` on the command line).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from medclf import classifier, data, features, jobrecord, layout, runtime, storage
from medclf.config import DatasetSpec, RunSpec, required
from medclf.errors import MedclfError

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    cfg, text_column = spec.predict, spec.dataset.text_column
    model_url, input_url = required(cfg.model, "predict.model"), required(cfg.input, "predict.input")
    output_url = required(cfg.output, "predict.output")
    storage.check_writable(output_url)
    # Every rank reads the record beside the output to decide whether there is work: a folder all see.
    accelerator = runtime.make_accelerator(storage.parent(output_url), what="the folder of predict.output")
    info = classifier.read_info(model_url)  # every file verified against the manifest
    inputs = {"predict.model": jobrecord.folder_fingerprint(model_url, "classifier")}
    inputs["predict.input"] = jobrecord.file_fingerprint(input_url)
    record_url, outputs = layout.predictions_record(output_url), [output_url]
    record = jobrecord.Record("predict", record_url, jobrecord.keys("predict", spec), inputs, outputs, outputs)
    if jobrecord.up_to_date(record, spec.overwrite, accelerator):
        return
    model, tokenizer, info = classifier.load(model_url, info)
    model.to(accelerator.device)

    started, rows = time.perf_counter(), 0
    # The output is written by the main process only, atomically: complete at the end or absent.
    writer = storage.atomic_write(output_url) if accelerator.is_main_process else contextlib.nullcontext()
    with storage.open_read(input_url) as source, writer as sink:
        for chunk in _chunks(source, input_url, spec.dataset, cfg.chunk_rows):
            # -- check, encode and classify one chunk
            texts = chunk[text_column]
            empty = np.flatnonzero((texts.str.strip() == "").to_numpy())
            if len(empty):
                raise MedclfError(f"{cfg.input}: row {rows + int(empty[0]) + 1}: empty {text_column}")
            vectors = features.encode(model, tokenizer, texts.tolist(), info.windowing, cfg.batch_size, accelerator)
            with torch.no_grad():
                probs = torch.softmax(model.head(vectors.to(accelerator.device)).float(), -1).cpu().numpy()

            # -- write the chunk's rows in input order (main process)
            if sink is not None:
                table = chunk.drop(columns=[text_column])
                table.insert(0, "row", np.arange(rows, rows + len(chunk)))
                for i, name in enumerate(info.classes):
                    table[f"prob_{name}"] = probs[:, i]
                table["predicted_specialty"] = np.asarray(info.classes)[probs.argmax(1)]
                sink.write(table.to_csv(index=False, header=rows == 0, float_format="%.6f").encode("utf-8"))
            rows += len(chunk)
            log.info("%d rows classified, %.1f notes/s", rows, rows / (time.perf_counter() - started))
        if rows == 0:
            raise MedclfError(f"{cfg.input}: no rows to classify")
    if accelerator.is_main_process:
        jobrecord.write(record)
    accelerator.wait_for_everyone()
    log.info("wrote %s: %d rows", cfg.output, rows)


def _chunks(source, url: str, columns: DatasetSpec, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """DataFrames of at most chunk_rows rows, all values as text, read and checked as every job's
    input is (data.record_chunks); a missing text column names the file, its key and the columns present."""
    for names, records in data.record_chunks(source, url, [columns.text_column], columns, chunk_rows):
        yield pd.DataFrame(records, columns=names, dtype=str)
