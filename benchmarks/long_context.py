"""What a zero-shot conversion keeps at long range: passkey retrieval and loss by position, source vs converted.

    python benchmarks/long_context.py --targets mla,gla,gta --rankings energy,rotation

SmolLM2-135M (the bundled GGUF) at 50% of its KV cache: MLA (one latent), GLA-3 (three latent heads) and GTA at
its default widths, each converted with the default pipeline (aware init and output refit) calibrated on the first
`--calib-chars` characters of WikiText-2, once per `--credits` value of `--rope-rotation-credit` (0.5: the default
since 0.3; 1: the default before it). Per model, on text from character `--eval-from-char` on:

- perplexity on `--windows` windows of 1024 tokens (the figure the README and earlier tables use);
- loss by position bucket on `--long-windows` windows of `--long-window` tokens, against the source's loss on the
  same windows, and the distance growth (model/source perplexity ratio in the last bucket over the first);
- passkey accuracy (the `gtakit eval --passkey` prompts, filler haystack) per length with its 95% Wilson
  interval; `--trials` keys per depth, `LENGTH:TRIALS` in `--lengths` overrides it for one length.

Results go to the JSON after every model, and a rerun with the same JSON skips the models already there (a run
killed after hours keeps what finished). Prints one markdown table; `--report A.json,B.json` prints it for the
results of several runs (e.g. the source and the conversions measured by two processes at once) and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_text_split_arguments, calibration_and_eval_text, markdown_table  # noqa: E402
from convert_quality import budget_settings  # noqa: E402

from gtakit.convert import ConvertOptions  # noqa: E402
from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.evaluate.passkey import DEFAULT_DEPTHS, passkey  # noqa: E402
from gtakit.evaluate.positions import compare_buckets, position_losses  # noqa: E402
from gtakit.evaluate.stats import rate_with_interval  # noqa: E402
from gtakit.evaluate.windows import perplexity  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402


def conversion_settings(target: str, budget: int, head_dim: int) -> dict:
    """50% of the cache: GTA at its defaults; MLA and GLA-3 at the widest latent that fits with the default RoPE."""
    if target == "gta":
        return {"target": "gta"}
    setting = budget_settings(target, budget, 3 if target == "gla" else 1, head_dim)
    if target == "mla":
        setting.pop("latent_heads")
    return setting


def length_trials(spec: str, trials: int) -> list[tuple[int, int]]:
    """`1024,2048,8192:1` -> [(1024, trials), (2048, trials), (8192, 1)]."""
    pairs = []
    for item in spec.split(","):
        length, _, count = item.partition(":")
        pairs.append((int(length), int(count) if count else trials))
    return pairs


def measure(model, tokenizer, eval_text: str, args) -> dict:
    started = time.time()
    row = {"perplexity_1024": perplexity(model, tokenizer, eval_text, args.windows * 1024, window=1024)["perplexity"]}
    row["long"] = position_losses(model, tokenizer, eval_text, args.long_window, args.long_windows * args.long_window)
    row["passkey"] = {}
    for length, trials in length_trials(args.lengths, args.trials):
        depths = tuple(float(d) for d in args.depths.split(","))
        result = passkey(model, tokenizer, (length,), depths, trials, seed=args.seed)
        row["passkey"][str(length)] = result["by_length"][length]
        print(f"  passkey {length}: {rate_with_interval(**_rate(result['by_length'][length]))}", flush=True)
    row["eval_seconds"] = round(time.time() - started)
    return row


def _rate(entry: dict) -> dict:
    return {"rate": entry["accuracy"], "interval": entry["interval"]}


def table(results: dict, lengths: list[int]) -> str:
    source = results["source"]
    rows = []
    for name, row in results.items():
        ppl = row["perplexity_1024"]
        line = {"model": name, "ppl": f"{ppl:.2f} ({ppl / source['perplexity_1024']:.3f}x)"}
        line.update({str(n): rate_with_interval(**_rate(row["passkey"][str(n)])) if str(n) in row["passkey"] else "-"
                     for n in lengths})
        if name != "source":
            compared = compare_buckets(row["long"]["buckets"], source["long"]["buckets"])
            line["ratios"] = " / ".join(f"{b['ratio']:.3f}" for b in compared["buckets"])
            line["growth"] = f"{compared['distance_growth']:.3f}"
        rows.append(line)
    bounds = " / ".join(f"{b['start']}-{b['end']}" for b in source["long"]["buckets"])
    columns = [("model", "model"), ("ppl", "ppl@1024 (x source)")] + [(str(n), f"passkey {n}") for n in lengths]
    columns += [("ratios", f"ppl ratio by position ({bounds})"), ("growth", "distance growth")]
    return markdown_table(rows, columns)


def report(paths: str, lengths: list[int]) -> None:
    """The table of several runs' JSON files (the source's row from whichever has it)."""
    results = {}
    for path in paths.split(","):
        results.update(json.loads(Path(path).read_text())["results"])
    print(table({"source": results.pop("source"), **results}, lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_split_arguments(parser, windows=16)
    parser.set_defaults(calib_tokens=16_384)
    parser.add_argument("--targets", default="mla,gla,gta")
    parser.add_argument("--credits", default="0.5,1", help="--rope-rotation-credit values to compare")
    parser.add_argument("--lengths", default="1024,2048,4096,8192:1", help="LENGTH[:TRIALS per depth],...")
    parser.add_argument("--trials", type=int, default=4, help="keys per depth")
    parser.add_argument("--depths", default=",".join(str(d) for d in DEFAULT_DEPTHS), help="needle depths (0-1)")
    parser.add_argument("--long-window", type=int, default=8192)
    parser.add_argument("--long-windows", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], help="extra ConvertOptions FIELD=VALUE")
    parser.add_argument("--json", default="benchmarks/out/long_context.json")
    parser.add_argument("--skip-source", action="store_true", help="measure only the conversions")
    parser.add_argument("--report", help="comma-separated JSON files of earlier runs: print their table and exit")
    args = parser.parse_args()
    lengths = [n for n, _ in length_trials(args.lengths, args.trials)]
    if args.report:
        return report(args.report, lengths)
    calib_path, eval_text = calibration_and_eval_text(args.text, args.json, args.calib_chars, args.eval_from_char)
    out = Path(args.json)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    source = open_source(None)
    tokenizer = source.load_tokenizer()
    if "source" not in results and not args.skip_source:
        results["source"] = measure(source.load_model(), tokenizer, eval_text, args)
        save(out, args, results)
    budget = source.config.num_key_value_heads * source.config.head_dim  # half of keys + values
    extra = {}
    for item in args.option:
        field, _, value = item.partition("=")
        default = getattr(ConvertOptions(), field)
        extra[field] = type(default)(value) if isinstance(default, (int, float)) and value.isdigit() else value
    for target in filter(None, args.targets.split(",")):
        for credit in filter(None, args.credits.split(",")):
            name = f"{target} 50% (credit {credit})"
            if name in results:
                continue
            started = time.time()
            options = ConvertOptions(init="aware", calib=str(calib_path), calib_tokens=args.calib_tokens,
                                     rope_rotation_credit=float(credit), **conversion_settings(target, budget, source.config.head_dim),
                                     **extra)
            model, _ = convert_in_memory(source, options)
            converted = round(time.time() - started)
            print(f"{name}: converted in {converted} s", flush=True)
            results[name] = {**measure(model, tokenizer, eval_text, args),
                             "convert_seconds": converted}
            save(out, args, results)
            del model
    if "source" in results:
        print(table(results, lengths))


def save(out: Path, args, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
