"""What one causal attention costs on the CPU at the head widths of SmolLM2-135M and its GLA-3 / MLA conversions.

    python benchmarks/attention_widths_cpu.py                     # 2048 and 8192 tokens, 3 repeats
    python benchmarks/attention_widths_cpu.py --lengths 2048 --repeats 5

Times `torch.nn.functional.scaled_dot_product_attention` alone (random fp32 tensors, batch 1, the source's 9 query
heads, causal) for each model's prefill widths three ways: as gtakit runs it (values zero-padded to the key width,
because SDPA's fused CPU kernel needs one width for q, k and v), with the unequal widths passed as they are (SDPA
then takes its math path), and at one width with the same arithmetic as the unequal pair ((qk + v) / 2, fused): the
last is what a fused kernel accepting unequal widths could at best reach. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish_timing_table, markdown_table  # noqa: E402
from convert_quality import budget_settings  # noqa: E402

HEADS, HEAD_DIM, KV_HEADS = 9, 64, 3  # SmolLM2-135M


def prefill_widths() -> dict[str, tuple[int, int]]:
    """(query/key width, value width) of each model's prefill SDPA at 50% of the source's KV cache."""
    budget = KV_HEADS * HEAD_DIM
    gla, mla = budget_settings("gla", budget, 3, HEAD_DIM), budget_settings("mla", budget, 1, HEAD_DIM)
    return {
        "source (GQA)": (HEAD_DIM, HEAD_DIM),
        # GLA-3 attends in the latent space when the latent is narrower than the no-RoPE key.
        "GLA-3 50%": (min(gla["kv_rank"], HEAD_DIM) + gla["rope_dim"], min(gla["kv_rank"], HEAD_DIM)),
        "MLA 50%": (HEAD_DIM + mla["rope_dim"], HEAD_DIM),
    }


def seconds(qk: int, v: int, tokens: int, generator: torch.Generator) -> float:
    q, k = (torch.randn(1, HEADS, tokens, qk, generator=generator) for _ in range(2))
    value = torch.randn(1, HEADS, tokens, v, generator=generator)
    started = time.perf_counter()
    F.scaled_dot_product_attention(q, k, value, is_causal=True, scale=qk**-0.5)
    return time.perf_counter() - started


def median_seconds(qk: int, v: int, tokens: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    seconds(qk, v, tokens, generator)  # warm-up
    return statistics.median(seconds(qk, v, tokens, generator) for _ in range(repeats))


def rows_for(tokens: int, repeats: int) -> list[dict]:
    rows, base = [], None
    for name, (qk, v) in prefill_widths().items():
        ways = {"as run (v padded)": (qk, qk), "unequal (math path)": (qk, v),
                "same arithmetic, one width": ((qk + v) // 2, (qk + v) // 2)}
        for way, (q_width, v_width) in ways.items():
            if qk == v and way != "as run (v padded)":
                continue
            median = median_seconds(q_width, v_width, tokens, repeats)
            base = median if base is None else base
            rows.append({"model": name, "tokens": tokens, "widths": f"{qk}/{v}", "way": way,
                         "sdpa_widths": f"{q_width}/{v_width}", "seconds": round(median, 4),
                         "vs_source": f"{median / base:.2f}x"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/out/attention_widths_cpu.json")
    args = parser.parse_args()
    rows = []
    for tokens in (int(n) for n in args.lengths.split(",")):
        length_rows = rows_for(tokens, args.repeats)
        rows += length_rows
        print(markdown_table(length_rows, COLUMNS), flush=True)
    finish_timing_table(rows, COLUMNS, args.json)


COLUMNS = [("model", "model"), ("tokens", "tokens"), ("widths", "q,k / v widths"), ("way", "SDPA call"),
           ("sdpa_widths", "widths passed"), ("seconds", "median s"), ("vs_source", "vs source")]

if __name__ == "__main__":
    main()
