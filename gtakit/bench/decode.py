"""Decode-attention benchmark: GTA / GLA-2 / MLA Triton kernels against SDPA on the GQA cache and PyTorch MLA.

One decode step of one layer for a realistic shape (default H = 32, d = 128): GQA G = 8 (torch SDPA, flash
backend), GTA G = 8 with d_r = 64, MLA d_c = 512 and GLA-2 d_c = 256 with d_r = 64 (our kernels), and a plain
PyTorch absorbed MLA. For each batch x context x query length: median time (`triton.testing.do_bench`),
bytes moved (cache read + queries + outputs), GB/s, fraction of a device copy's bandwidth measured in the same
run, and speed-up over the GQA baseline. Prints a markdown table and writes JSON.

Run `python benchmarks/bench_decode.py --help` or `gtakit bench decode --help`. Needs CUDA; `--dry-run` lists
the cases and their bytes, `--interpret` runs tiny shapes on CPU through TRITON_INTERPRET=1 (code-path check).
This module lives outside gtakit.kernels so that importing it does not build the kernels before `--interpret`
can set TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from gtakit.bench.tables import markdown_table

L2_FLUSH_BYTES = 256 * 2**20  # rotate cache copies until this many bytes so small cases do not sit in L2
MAX_COPIES = 64


def build_parser() -> argparse.ArgumentParser:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    p = argparse.ArgumentParser(prog="bench_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=ints, default=[1, 8, 32, 128], help="comma-separated batch sizes")
    p.add_argument("--context", type=ints, default=[1024, 8192, 32768, 65536], help="comma-separated cache lengths")
    p.add_argument("--q-len", type=ints, default=[1, 4], help="comma-separated query lengths (1..16)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--gqa-groups", type=int, default=8)
    p.add_argument("--gta-groups", type=int, default=8)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--mla-rank", type=int, default=512)
    p.add_argument("--gla-heads", type=int, default=2)
    p.add_argument("--gla-rank", type=int, default=256)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--page-size", type=int, default=0, help="0: contiguous cache; else paged with this page size")
    p.add_argument("--methods", default="gqa_sdpa,gta,gla2,mla,mla_torch", help="comma-separated subset")
    for knob in ("num-splits", "block-m", "block-n", "num-warps", "num-stages"):
        p.add_argument(f"--{knob}", type=int, default=None, help="override the kernels' launch heuristic (tuning)")
    p.add_argument("--max-cache-gib", type=float, default=40.0, help="skip cases whose one cache exceeds this")
    p.add_argument("--rep", type=int, default=100, help="do_bench time budget (ms)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/bench_decode.json"))
    p.add_argument("--dry-run", action="store_true", help="list cases and bytes; no GPU needed")
    p.add_argument("--interpret", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    return p


def method_specs(args) -> dict[str, dict]:
    """Per method: groups n, state width W, rope width R, and KV elements per token (for bytes)."""
    d, r = args.head_dim, args.rope_dim
    return {
        "gqa_sdpa": dict(groups=args.gqa_groups, width=d, rope=0, per_token=2 * args.gqa_groups * d),
        "gta": dict(groups=args.gta_groups, width=d, rope=r, per_token=args.gta_groups * d + r),
        "gla2": dict(groups=args.gla_heads, width=args.gla_rank, rope=r, per_token=args.gla_heads * args.gla_rank + r),
        "mla": dict(groups=1, width=args.mla_rank, rope=r, per_token=args.mla_rank + r),
        "mla_torch": dict(groups=1, width=args.mla_rank, rope=r, per_token=args.mla_rank + r),
    }


def case_bytes(spec: dict, batch: int, context: int, q_len: int, heads: int, head_dim: int, elsize: int) -> int:
    """Cache read once + queries read + outputs written (GQA: d-wide; latent forms: W + R wide query, W out)."""
    cache = batch * context * spec["per_token"]
    if spec["rope"]:
        io = batch * heads * q_len * (2 * spec["width"] + spec["rope"])
    else:
        io = batch * heads * q_len * 2 * head_dim
    return (cache + io) * elsize


def _cases(args):
    for q_len in args.q_len:
        for batch in args.batch:
            for context in args.context:
                yield batch, context, q_len


def _make_runner(name, spec, args, batch, context, q_len, dtype, device):
    """Returns a zero-argument callable running one decode step on fresh (rotated) inputs."""
    import torch
    import torch.nn.functional as F

    from gtakit.kernels import choose_config, gla_decode, gta_decode, to_paged

    heads, d = args.heads, args.head_dim
    elsize = torch.empty((), dtype=dtype).element_size()
    one_cache = batch * context * spec["per_token"] * elsize
    copies = max(1, min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / max(one_cache, 1))))
    scale = (d + (spec["rope"] if name != "gta" else 0)) ** -0.5

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    groups, width, rope = spec["groups"], spec["width"], spec["rope"]
    items = []
    for _ in range(copies):
        if name == "gqa_sdpa":
            # Best GQA formulation for decode: each KV head attends with its rep * q_len query rows (no expand).
            # No causal mask among the q_len rows: it would cost nothing measurable at these lengths.
            q = rand(batch, groups, heads // groups * q_len, d)
            items.append((q, rand(batch, groups, context, d), rand(batch, groups, context, d)))
            continue
        state, rope_key = rand(batch, groups, context, width), rand(batch, 1, context, rope)
        q_width = d if name == "gta" else width
        queries = (rand(batch, heads, q_len, q_width),) if name == "gta" else (
            rand(batch, heads, q_len, width), rand(batch, heads, q_len, rope))
        lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        table = None
        if args.page_size and name != "mla_torch":
            state, rope_key, table = to_paged(state, rope_key, lengths, page_size=args.page_size)
        items.append((queries, state, rope_key, lengths, table))
    counter = [0]

    def pick():
        counter[0] = (counter[0] + 1) % copies
        return items[counter[0]]

    if name == "gqa_sdpa":
        def run():
            q, k, v = pick()
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif name == "mla_torch":
        def run():
            (q_latent, q_rope), latent, rope_key, _, _ = pick()
            # The model's absorbed path: all heads against the single latent, fp32 softmax.
            scores = q_latent.view(batch, 1, heads * q_len, width) @ latent.transpose(-1, -2)
            scores = scores + q_rope.view(batch, 1, heads * q_len, rope) @ rope_key.transpose(-1, -2)
            probs = torch.softmax(scores.float() * scale, dim=-1).to(dtype)
            return probs @ latent
    else:
        op = gta_decode if name == "gta" else gla_decode
        knobs = dict(num_splits=args.num_splits, block_m=args.block_m, block_n=args.block_n,
                     num_warps=args.num_warps, num_stages=args.num_stages)
        config = None
        if any(v is not None for v in knobs.values()):
            rows = heads // groups * q_len
            config = choose_config(batch, groups, rows, width, context, device, **knobs)

        def run():
            queries, state, rope_key, lengths, table = pick()
            return op(*queries, state, rope_key, scale=scale, lengths=lengths, block_table=table, config=config)
    return run, copies


def check_kernels(args, specs: dict, methods: list[str], dtype, device) -> dict[str, float]:
    """Relative error of each Triton kernel against its PyTorch reference on a small ragged paged batch, so a
    broken build is never timed."""
    import torch

    from gtakit.kernels import gla_decode, gta_decode, naive_gla_decode, naive_gta_decode, to_paged

    errors = {}
    context = min(1000, max(args.context))
    for name in [m for m in methods if m in ("gta", "gla2", "mla")]:
        spec = specs[name]
        groups, width, rope = spec["groups"], spec["width"], spec["rope"]
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=device).to(dtype)

        q_len = max(args.q_len)
        state, rope_key = rand(2, groups, context, width), rand(2, 1, context, rope)
        queries = (rand(2, args.heads, q_len, width if name != "gta" else args.head_dim),)
        if name != "gta":
            queries += (rand(2, args.heads, q_len, rope),)
        lengths = torch.tensor([context, max(q_len, context // 3)], dtype=torch.int32, device=device)
        op, naive = (gta_decode, naive_gta_decode) if name == "gta" else (gla_decode, naive_gla_decode)
        ref = naive(*queries, state, rope_key, scale=0.1, lengths=lengths).float()
        pages, rope_pages, table = to_paged(state, rope_key, lengths, page_size=args.page_size or 64)
        for cache, block_table in (((state, rope_key), None), ((pages, rope_pages), table)):
            out = op(*queries, *cache, scale=0.1, lengths=lengths, block_table=block_table).float()
            err = ((out - ref).norm() / ref.norm()).item()
            errors[name] = max(errors.get(name, 0.0), err if err == err else float("inf"))
    return errors


def measure_copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + written), median of do_bench."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _time(fn, interpret: bool, rep: int) -> float:
    if interpret:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, rep=rep, return_mode="median")


COLUMNS = [("batch", "batch"), ("context", "context"), ("q_len", "q_len"), ("method", "method"),
           ("kv_bytes_per_token", "KV B/token"), ("ms", "ms"), ("gbps", "GB/s"), ("copy_frac", "of copy BW"),
           ("speedup", "vs GQA")]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interpret:
        # Triton reads this when the kernels are decorated: before gtakit.kernels is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        if "gtakit.kernels" in sys.modules and not sys.modules["gtakit.kernels"].kernels_interpreted():
            print("error: --interpret must run before gtakit.kernels is imported in this process", file=sys.stderr)
            return 2
        args.batch, args.context, args.q_len = [2], [64], [1, 4]
        args.heads, args.head_dim, args.gqa_groups, args.gta_groups, args.rope_dim = 4, 16, 2, 2, 8
        args.mla_rank, args.gla_rank = 32, 16
    import torch

    methods = [m for m in args.methods.split(",") if m]
    specs = method_specs(args)
    unknown = set(methods) - set(specs)
    if unknown:
        print(f"error: unknown methods {sorted(unknown)}; choose from {sorted(specs)}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    elsize = 2
    if args.dry_run:
        rows = []
        for batch, context, q_len in _cases(args):
            for name in methods:
                nbytes = case_bytes(specs[name], batch, context, q_len, args.heads, args.head_dim, elsize)
                rows.append(dict(batch=batch, context=context, q_len=q_len, method=name,
                                 kv_bytes_per_token=specs[name]["per_token"] * elsize, bytes=nbytes))
        print(markdown_table(rows, COLUMNS[:5] + [("bytes", "bytes")]))
        return 0
    if not args.interpret and not torch.cuda.is_available():
        print("error: bench_decode needs a CUDA GPU (use --dry-run or --interpret on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.interpret else "cuda")
    if args.interpret:
        dtype = torch.float32  # the interpreter's bf16 dot is unreliable; this mode checks code paths only
        elsize = 4
    errors = check_kernels(args, specs, methods, dtype, device)
    print("kernel vs reference relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if any(not err < 2e-2 for err in errors.values()):
        print("error: a kernel disagrees with its reference; not timing it", file=sys.stderr)
        return 1
    copy_gbps = None if args.interpret else measure_copy_bandwidth(device)
    if copy_gbps:
        print(f"device copy bandwidth: {copy_gbps:.0f} GB/s ({torch.cuda.get_device_name(device)})")
    rows = []
    for batch, context, q_len in _cases(args):
        base_ms = None
        for name in methods:
            spec = specs[name]
            row = dict(batch=batch, context=context, q_len=q_len, method=name,
                       kv_bytes_per_token=spec["per_token"] * elsize)
            if batch * context * spec["per_token"] * elsize > args.max_cache_gib * 2**30:
                row["ms"] = "skipped (cache > --max-cache-gib)"
                rows.append(row)
                continue
            try:
                run, _ = _make_runner(name, spec, args, batch, context, q_len, dtype, device)
                ms = _time(run, args.interpret, args.rep)
            except torch.OutOfMemoryError:
                row["ms"] = "OOM"
                rows.append(row)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            nbytes = case_bytes(spec, batch, context, q_len, args.heads, args.head_dim, elsize)
            gbps = nbytes / (ms * 1e-3) / 1e9
            if name == "gqa_sdpa":
                base_ms = ms
            row.update(ms=round(ms, 4), bytes=nbytes, gbps=round(gbps, 1),
                       copy_frac=f"{gbps / copy_gbps:.0%}" if copy_gbps else "",
                       speedup=f"{base_ms / ms:.2f}x" if base_ms else "")
            rows.append(row)
            print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    print()
    print(markdown_table(rows, COLUMNS))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    meta = dict(kernel_rel_errors=errors, device=device_name, torch=torch.__version__, copy_gbps=copy_gbps,
                args={k: str(v) for k, v in vars(args).items()})
    import triton

    meta["triton"] = triton.__version__
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
