"""How much calibration is enough: zero-shot quality and conversion time against --calib-tokens.

    python benchmarks/calib_curve.py --tokens 16384,32768,65536,131072,262144 --windows 16
    python benchmarks/calib_curve.py --tokens 65536 --refit-tokens 0,16384,4096 --windows 16   # a cheaper refit

Converts the bundled SmolLM2-135M with the command line's defaults for `--to gla` (or `--target`) at each
calibration size, in memory, and measures perplexity on `--windows` windows of 1024 tokens. The calibration text is
the first `--calib-chars` characters of WikiText-2 and the evaluation starts at `--eval-from-char`, so the two never
overlap (the defaults leave room for 262,144 calibration tokens and 16 evaluation windows). For each size it also
times one fp32 forward of the source over the same calibration tokens (same sequence length, micro-batches of the
calibrator's size), the yardstick of the conversion-time goal. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, add_text_split_arguments, calibration_and_eval_text, markdown_table  # noqa: E402

from gtakit.convert import ConvertOptions, open_convertible  # noqa: E402
from gtakit.convert.calibration import MICRO_BATCH_TOKENS, calibration_ids  # noqa: E402
from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.evaluate import perplexity  # noqa: E402

COLUMNS = [
    ("calib_tokens", "calibration tokens"),
    ("refit_tokens", "refit tokens"),
    ("ridge", "refit ridge"),
    ("ppl", "perplexity"),
    ("ppl_ratio", "ppl vs source"),
    ("convert_s", "conversion s"),
    ("forward_s", "source forward s"),
    ("time_ratio", "conversion / forward"),
    ("peak_mb", "peak RSS MB"),
]


@torch.no_grad()
def source_forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """One fp32 forward of the source over `ids`, in the calibrator's micro-batches (no logits kept)."""
    rows = max(1, MICRO_BATCH_TOKENS["cpu"] // ids.shape[1])
    started = time.time()
    for start in range(0, ids.shape[0], rows):
        model.model(input_ids=ids[start : start + rows], use_cache=False)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_split_arguments(parser, windows=16)
    parser.set_defaults(calib_chars=1_200_000, eval_from_char=1_210_000)
    parser.add_argument("--tokens", default="16384,32768,65536,131072,262144")
    parser.add_argument("--target", default="gla")
    parser.add_argument("--refit", default="auto", help="--refit of the conversions (auto: output)")
    parser.add_argument("--refit-tokens", default="0",
                        help="comma-separated --refit-tokens to compare at each --tokens (0: all of them)")
    parser.add_argument("--refit-ridges", default="0.0001",
                        help="comma-separated --refit-ridge values to compare at each size")
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--json", default="benchmarks/out/calib_curve/calib_curve.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    calib_path, eval_text = calibration_and_eval_text(args.text, args.json, args.calib_chars, args.eval_from_char)
    eval_tokens = args.windows * args.window
    source = open_convertible(None)
    tokenizer = source.load_tokenizer()
    model = source.load_model(torch.float32).eval()
    base = perplexity(model, tokenizer, eval_text, eval_tokens, window=args.window)
    if base["windows"] < args.windows:
        raise SystemExit(f"only {base['windows']} evaluation windows after character {args.eval_from_char}")
    print(f"source perplexity {base['perplexity']:.3f} on {base['windows']} windows", flush=True)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",") if t]:
        ids = calibration_ids(source, str(calib_path), tokens, args.calib_seq_len)
        forward_s = source_forward_seconds(model, ids)
        for refit_tokens in [int(t) for t in args.refit_tokens.split(",") if t]:
            for ridge in [float(r) for r in args.refit_ridges.split(",") if r]:
                rows.append(convert_and_measure(source, args, calib_path, tokens, refit_tokens, ridge, forward_s,
                                                ids.numel(), tokenizer, eval_text, eval_tokens, base))
                print(markdown_table(rows[-1:], COLUMNS), flush=True)
    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    Path(args.json).write_text(json.dumps({
        "command": " ".join(sys.argv),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "source_perplexity": base["perplexity"],
        "eval": {"windows": base["windows"], "window": args.window, "from_char": args.eval_from_char},
        "rows": rows,
        "table": table,
    }, indent=2))


def convert_and_measure(source, args, calib_path, tokens: int, refit_tokens: int, ridge: float, forward_s: float,
                        calib_tokens: int, tokenizer, eval_text: str, eval_tokens: int, base: dict) -> dict:
    options = ConvertOptions(target=args.target, calib=str(calib_path), calib_tokens=tokens,
                             calib_seq_len=args.calib_seq_len, refit=args.refit, refit_tokens=refit_tokens,
                             refit_ridge=ridge)
    with PeakRSS() as mem:
        started = time.time()
        converted, _ = convert_in_memory(source, options)
        convert_s = time.time() - started
    result = perplexity(converted, tokenizer, eval_text, eval_tokens, window=args.window)
    return {"calib_tokens": int(calib_tokens), "refit_tokens": refit_tokens or "all", "ridge": ridge,
            "ppl": round(result["perplexity"], 3), "ppl_ratio": f"{result['perplexity'] / base['perplexity']:.3f}x",
            "convert_s": round(convert_s, 1), "forward_s": round(forward_s, 1),
            "time_ratio": f"{convert_s / forward_s:.2f}x", "peak_mb": round(mem.peak_mb),
            "settings": options.to_dict()}


if __name__ == "__main__":
    main()
