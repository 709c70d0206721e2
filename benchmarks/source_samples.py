"""Training text the source writes itself: unconditional samples, as JSON lines, for distillation without data.

    python benchmarks/source_samples.py benchmarks/out/samples.jsonl --tokens 65536
    python benchmarks/recovery_curve.py --train-data benchmarks/out/samples.jsonl ...   # distil on them

The samples `gtakit finetune` writes with `data.teacher_samples` (gtakit/finetune/samples.py: from the BOS token
alone, temperature 1, no top-k/top-p cut; a row ends at the source's EOS or after `--length` tokens), decoded to
text so that a recipe or another benchmark can read them as a file. Rows are seeded, so the same command writes
the same file. Prints the tokens written and the rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gtakit.finetune.samples import sample_batch  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON lines file to write ({'text': ...} per row)")
    parser.add_argument("--source", default=None, help="source model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=65_536, help="stop once this many tokens are written")
    parser.add_argument("--length", type=int, default=512, help="tokens per row at most")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = open_source(args.source)
    tokenizer, model = source.load_tokenizer(), source.load_model().eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    written, started, batch_index = 0, time.time(), 0
    partial = args.out.with_suffix(args.out.suffix + ".partial")
    with partial.open("w") as handle, torch.no_grad():
        while written < args.tokens:
            for row in sample_batch(model, torch.device("cpu"), bos, tokenizer.eos_token_id, args.batch,
                                    args.length, args.seed * 1_000_003 + batch_index):
                handle.write(json.dumps({"text": tokenizer.decode(row)}) + "\n")
                written += len(row)
            batch_index += 1
            print(f"{written} tokens, {written / (time.time() - started):.0f} tokens/s", flush=True)
    partial.rename(args.out)
    print(f"wrote {written} tokens in {batch_index * args.batch} rows to {args.out} "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
