"""Training text the teacher writes itself: unconditional samples for distillation without a covering corpus.

Each sample starts from the BOS token alone (no prompt, so no domain is chosen for the teacher) and is drawn at
temperature 1 with no top-k/top-p cut, i.e. from the teacher's own distribution; it ends at the teacher's EOS or
after `length` new tokens. The checkpoint's own sampling defaults (repetition penalty, top-p, ...) are set aside
for the call, so they do not bend the distribution. Samples are token ids, never decoded and
re-tokenised, and are seeded per batch without touching the training run's random state.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from gtakit.errors import GtakitError


def sample_batch(teacher, device: torch.device, bos: int, eos: int, batch: int, length: int, seed: int
                 ) -> list[list[int]]:
    """`batch` samples of at most `length` tokens each (their EOS and the BOS excluded)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                              min_new_tokens=1, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    start = torch.full((batch, 1), bos, device=device)
    forked = [device] if device.type == "cuda" else []
    # generate() fills the values a passed config leaves at their defaults (temperature 1, top_p 1, no
    # repetition penalty) from the model's own generation_config, so that one is swapped out for the call
    saved = teacher.generation_config
    teacher.generation_config = config
    try:
        with torch.random.fork_rng(devices=forked), torch.no_grad():
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            out = teacher.generate(start, attention_mask=torch.ones_like(start))
    finally:
        teacher.generation_config = saved
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


def start_and_end(tokenizer) -> tuple[int, int]:
    """(the token a sample starts from, the token that ends it): BOS (EOS where there is none) and EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GtakitError("the tokenizer has no EOS token to end the samples with; teacher samples need one")
    return (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos), eos


def sample_batches(teacher, device: torch.device, tokenizer, length: int, batch: int, seed: int
                   ) -> Iterator[list[list[int]]]:
    """Batch after batch of samples (see `sample_batch`), batch i seeded from (seed, i); the caller stops."""
    bos, eos = start_and_end(tokenizer)
    for index in itertools.count():
        yield sample_batch(teacher, device, bos, eos, batch, length, seed * 1_000_003 + index)


def teacher_samples(teacher, device: torch.device, tokenizer, tokens: int, length: int, batch: int, seed: int,
                    progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Samples (int32 ids, each followed by EOS) until at least `tokens` ids are written."""
    eos = start_and_end(tokenizer)[1]
    pieces: list[torch.Tensor] = []
    written = 0
    for rows in sample_batches(teacher, device, tokenizer, length, batch, seed):
        for row in rows:
            pieces.append(torch.tensor(row + [eos], dtype=torch.int32))
            written += len(row) + 1
        if progress is not None:
            progress(written)
        if written >= tokens:
            break
    return pieces


def write_samples_file(teacher, device: torch.device, tokenizer, out: Path, tokens: int, length: int, batch: int,
                       seed: int, log: Callable[[str], None] | None = None) -> dict:
    """The samples as JSON lines ({"text": ...} per sample, decoded), written to a temporary file that is renamed
    at the end: text that `gtakit convert --calib` and a recipe's data.train read like any corpus."""
    partial = out.with_name(out.name + ".partial")
    written = count = 0
    started = time.time()
    with partial.open("w", encoding="utf-8") as handle:
        for rows in sample_batches(teacher, device, tokenizer, length, batch, seed):
            for row in rows:
                handle.write(json.dumps({"text": tokenizer.decode(row)}) + "\n")
                written, count = written + len(row), count + 1
            if log is not None:
                log(f"{written:,} tokens ({written / (time.time() - started):.0f} tokens/s)")
            if written >= tokens:
                break
    partial.replace(out)
    return {"tokens": written, "samples": count, "seconds": round(time.time() - started, 1)}
