"""Training data: read documents, tokenise them once, pack them into fixed-length rows.

Packing: every document is tokenised without special tokens, followed by the tokenizer's EOS token, and the
documents are concatenated into one stream that is cut into rows of `seq_len` tokens (the remainder is
dropped). Positions run 0..seq_len-1 in every row and attention is plain causal, so a row may hold the end of
one document, an EOS, and the start of the next: the EOS tells the model a new document starts (as in
pretraining of Llama-family models), and nothing needs a per-document mask, which keeps the student and the
teacher on the stock attention paths.

With data.teacher_samples the teacher's own samples (samples.py) are packed after the documents, as token ids
each followed by EOS, and cached with them: the cache key names the teacher and the seed that wrote them.

Data order is a pure function of (seed, step): rows are shuffled by a per-epoch permutation, so a resumed run
reads exactly the rows the uninterrupted run would have read, with nothing but the step count to restore.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from gtakit.errors import GtakitError
from gtakit.io.text import JSON_LINES_SUFFIXES, iter_dataset_texts, iter_json_lines, read_text_file

from .recipe import DataSection

TOKENIZE_BATCH = 512
FILE_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".parquet")


def _is_dataset_name(spec: str) -> bool:
    """`hf:NAME...`, or (as `gtakit convert --calib` reads it) anything that is not a file and does not look like
    a path: no such file, no leading . / ~, no text-file suffix."""
    if spec.startswith("hf:"):
        return True
    path = Path(spec).expanduser()
    return not (path.exists() or spec.startswith((".", "/", "~")) or path.suffix in FILE_SUFFIXES
                or any(ch in spec for ch in "*?["))


def resolve_files(specs: list[str], key: str) -> list[str]:
    """Expand globs; every entry must exist (checked before any model is loaded). `hf:` names pass through."""
    out: list[str] = []
    for spec in specs:
        if _is_dataset_name(spec):
            out.append(spec)
            continue
        expanded = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            matches = sorted(glob.glob(str(expanded)))
            if not matches:
                raise GtakitError(f"recipe key '{key}': no file matches {spec!r}")
            out += matches
        elif not expanded.is_file():
            raise GtakitError(f"recipe key '{key}': data file {spec} does not exist")
        else:
            out.append(str(expanded))
    for item in out:
        if item.endswith(".parquet"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise GtakitError(f"reading {item} needs pyarrow: pip install pyarrow") from None
        if _is_dataset_name(item):
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise GtakitError(f"recipe key '{key}': {item!r} is not a file; reading it as a datasets name needs "
                                  "the datasets package: pip install datasets") from None
    return out


def iter_documents(spec: str, text_field: str) -> Iterator[str]:
    """Documents of one source: a plain-text file is one document; JSON lines, parquet and dataset rows are one
    document each."""
    if _is_dataset_name(spec):
        yield from iter_dataset_texts(spec.removeprefix("hf:"), text_field, option="data")
        return
    path = Path(spec)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise GtakitError(f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)})")
        for value in table.column(text_field).to_pylist():
            yield str(value or "")
        return
    raw = read_text_file(path, "data file")
    if path.suffix in JSON_LINES_SUFFIXES:
        yield from iter_json_lines(raw, path, text_field)
        return
    yield raw


def _documents(specs: list[str], text_field: str, max_chars: int | None) -> Iterator[str]:
    total = 0
    for spec in specs:
        for doc in iter_documents(spec, text_field):
            if max_chars is not None and total + len(doc) > max_chars:
                doc = doc[: max_chars - total]
            if doc:
                yield doc
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return


def document_pieces(docs: Iterator[str], tokenizer) -> list[torch.Tensor]:
    """Token ids (int32) of each document followed by EOS."""
    eos = tokenizer.eos_token_id
    pieces: list[torch.Tensor] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(torch.tensor(list(ids) + ([eos] if eos is not None else []), dtype=torch.int32))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= TOKENIZE_BATCH:
            flush()
    if batch:
        flush()
    return pieces


def pack_pieces(pieces: list[torch.Tensor], seq_len: int) -> torch.Tensor:
    """Rows `[N, seq_len]` (int32, half the memory of int64) of the pieces laid end to end."""
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].view(rows, seq_len)


def pack_documents(docs: Iterator[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Rows `[N, seq_len]` of EOS-separated documents."""
    return pack_pieces(document_pieces(docs, tokenizer), seq_len)


def _fingerprint(data: DataSection, train: list[str], evals: list[str], tokenizer, seq_len: int,
                 samples_key: str) -> str:
    parts = {"train": train, "eval": evals, "field": data.text_field, "max_chars": data.max_chars,
             "eval_sequences": data.eval_sequences, "seq_len": seq_len, "vocab": len(tokenizer),
             "eos": tokenizer.eos_token_id, "tokenizer": getattr(tokenizer, "name_or_path", "")}
    if data.teacher_samples:
        parts["samples"] = [data.teacher_samples, data.sample_length, data.sample_batch, samples_key]
    for spec in train + evals:
        if not _is_dataset_name(spec):
            stat = Path(spec).stat()
            parts[spec] = [stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PackedData:
    train: torch.Tensor  # [N, seq_len] int32 (cast to int64 per batch)
    eval: torch.Tensor  # [M, seq_len] int32

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


# Writes the teacher's samples when the packed data are built (not when they are read from the cache).
SampleWriter = Callable[[], list[torch.Tensor]]


def build_packed_data(data: DataSection, tokenizer, seq_len: int, samples: SampleWriter | None = None
                      ) -> PackedData:
    train_specs = resolve_files(data.train, "data.train")
    eval_specs = resolve_files(data.eval, "data.eval")
    pieces = document_pieces(_documents(train_specs, data.text_field, data.max_chars), tokenizer)
    if data.teacher_samples:
        if samples is None:
            raise GtakitError("data.teacher_samples needs the teacher to write them (teacher.model)")
        pieces += samples()
    train = pack_pieces(pieces, seq_len)
    if eval_specs:
        held = pack_documents(_documents(eval_specs, data.text_field, None), tokenizer, seq_len)
        held = held[: data.eval_sequences]
        if len(held) == 0:
            raise GtakitError(f"data.eval gives less than one sequence of {seq_len} tokens")
    else:
        if len(train) < data.eval_sequences + 1:
            raise GtakitError(
                f"the training text packs into {len(train)} sequences of {seq_len} tokens; holding out "
                f"data.eval_sequences={data.eval_sequences} for evaluation leaves none to train on: add text, "
                "lower train.seq_len or data.eval_sequences, or give data.eval"
            )
        held, train = train[-data.eval_sequences :], train[: -data.eval_sequences]
    if len(train) == 0:
        raise GtakitError(f"the training text gives less than one sequence of {seq_len} tokens")
    return PackedData(train=train.contiguous(), eval=held.contiguous())


def load_packed_data(data: DataSection, tokenizer, seq_len: int, cache_dir: Path, accelerator,
                     samples: SampleWriter | None = None, samples_key: str = "") -> PackedData:
    """Tokenise once (main process first, cached in `cache_dir`); other processes and resumed runs load it.
    `samples_key` names the teacher (and seed) that writes the samples, so another teacher packs anew."""
    train_specs = resolve_files(data.train, "data.train")
    eval_specs = resolve_files(data.eval, "data.eval")
    cache = cache_dir / f"data-{_fingerprint(data, train_specs, eval_specs, tokenizer, seq_len, samples_key)}.pt"
    with accelerator.main_process_first():
        if cache.exists():
            stored = torch.load(cache, weights_only=True)
            return PackedData(train=stored["train"], eval=stored["eval"])
        packed = build_packed_data(data, tokenizer, seq_len, samples)
        if accelerator.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save({"train": packed.train, "eval": packed.eval}, tmp)
            tmp.rename(cache)
        return packed


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


class RowSampler:
    """Global row order: epoch e is a seeded permutation; position p of the stream is row perm_{p // N}[p % N].

    Micro-batch m of optimiser step s on process r of w reads stream positions
    ((s * accum + m) * w + r) * micro_batch ... + micro_batch - 1, so the order is independent of how the run
    was interrupted, and every process reads different rows."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self._cache: dict[int, torch.Tensor] = {}

    def row(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_rows)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_permutation(self.num_rows, self.seed, epoch)}
        return int(self._cache[epoch][offset])

    def micro_batch_rows(self, step: int, micro: int, accum: int, micro_batch: int, process: int,
                         num_processes: int) -> list[int]:
        start = ((step * accum + micro) * num_processes + process) * micro_batch
        return [self.row(p) for p in range(start, start + micro_batch)]
