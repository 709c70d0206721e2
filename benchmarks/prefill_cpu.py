"""Prefill (one full causal forward) time of SmolLM2-135M against its conversions, on the CPU.

    python benchmarks/prefill_cpu.py                          # 512 and 2048 tokens, 3 interleaved repeats
    python benchmarks/prefill_cpu.py --lengths 2048,8192 --repeats 2

Speed does not depend on the initialisation, so the conversions use the data-free `svd` init (no calibration).
Source and conversions run interleaved, one forward each per repeat, so that all see the same machine load; the
table gives medians, the time relative to the source, and the peak memory growth of the process over the run of
each model (ru_maxrss: a high-water mark, so only growth beyond earlier peaks shows). Prints a markdown table and
writes JSON.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish_timing_table, markdown_table  # noqa: E402
from convert_quality import budget_settings  # noqa: E402

from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.convert import ConvertOptions  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="gta,gla,mla,ghla",
                        help="conversions to time beside the source: gta, gla, gla-unfolded, mla, ghla")
    parser.add_argument("--json", default="benchmarks/out/prefill_cpu.json")
    args = parser.parse_args()
    source = open_source(None)
    d, G = source.config.head_dim, source.config.num_key_value_heads
    models = {"source (GQA)": source.load_model()}
    settings = {"gta": ("GTA default", {"target": "gta"}),
                "gla": ("GLA-3 50%", budget_settings("gla", G * d, 3, d)),
                "mla": ("MLA 50%", budget_settings("mla", G * d, 1, d)),
                "gla-unfolded": ("GLA-3 50%, W_uk/W_uv not folded", budget_settings("gla", G * d, 3, d)),
                "ghla": ("GHLA default (50%)", {"target": "ghla"})}
    for target in (t for t in args.targets.split(",") if t):
        label, setting = settings[target]
        options = ConvertOptions(init="svd", **{k: v for k, v in setting.items() if not (
            k == "latent_heads" and setting["target"] == "mla")})
        models[label] = convert_in_memory(source, options)[0]
        if target == "gla-unfolded":  # the same model applying W_uk / W_uv per token (as before the folding)
            for layer in models[label].model.layers:
                layer.self_attn.fold_weights = False
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        ids = torch.randint(3, source.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {name: [] for name in models}
        growth = {name: 0.0 for name in models}
        for name, model in models.items():  # warm-up, and each model's memory high-water mark
            before = peak_mb()
            forward_seconds(model, ids)
            growth[name] = peak_mb() - before
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(forward_seconds(model, ids))
        base = statistics.median(times["source (GQA)"])
        for name in models:
            median = statistics.median(times[name])
            rows.append({"model": name, "tokens": length, "seconds": round(median, 2),
                         "vs_source": f"{median / base:.2f}x", "peak_growth_mb": round(growth[name])})
        print(markdown_table(rows[-len(models):], COLUMNS), flush=True)
    finish_timing_table(rows, COLUMNS, args.json)


COLUMNS = [("model", "model"), ("tokens", "tokens"), ("seconds", "median s"), ("vs_source", "vs source"),
           ("peak_growth_mb", "peak memory growth MB")]

if __name__ == "__main__":
    main()
