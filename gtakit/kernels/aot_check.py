"""Compile the decode kernels for a GPU architecture without a GPU: catches GPU-only compile errors and shows
registers, spills and shared memory of the launch heuristics' configs (the CPU interpreter checks neither).

    python -m gtakit.kernels.aot_check            # sm_90 (H100), the benchmark's layer shapes
    python -m gtakit.kernels.aot_check --arch 80  # A100

Needs triton's NVIDIA backend (ptxas, cuobjdump ship in the triton wheel); must run without TRITON_INTERPRET.
Exit status 1 when a config fails to compile or spills registers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

# (label, groups, heads, q_len, state width, qk width, rope width): the layer shapes.
SHAPES = [
    ("gta", 8, 32, 1, 128, 64, 64), ("gta", 8, 32, 4, 128, 64, 64),
    ("gla2", 2, 32, 1, 256, 256, 64), ("gla2", 2, 32, 4, 256, 256, 64),
    ("mla", 1, 32, 1, 512, 512, 64), ("mla", 1, 32, 4, 512, 512, 64),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET to compile for a GPU", file=sys.stderr)
        return 2
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from . import _decode_core as core

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(tools, "cuobjdump")
    failed = False
    fn = core._grouped_decode_kernel
    for label, groups, heads, q_len, width, qk, rope in SHAPES:
        cfg = core.choose_config(1, groups, heads // groups * q_len, width, 65536, torch.device("cpu"), num_splits=1)
        for paged, splits in ((False, 1), (True, 8)):
            consts = dict(QK_DIM=qk, W=width, R=rope, BLOCK_W=core._pow2(width), BLOCK_R=core._pow2(rope),
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGED=paged, PAGE_SIZE=64 if paged else 1,
                          NUM_SPLITS=splits, IEEE_DOT=False, DOT_FP32=False)
            pointer = f"*{args.dtype}"
            types = dict(lengths_ptr="*i32", table_ptr="*i32", part_out_ptr="*fp32", part_lse_ptr="*fp32",
                         scale_log2="fp32")
            signature = {
                name: "constexpr" if name in consts else types.get(name, pointer if name.endswith("_ptr") else "i32")
                for name in fn.arg_names
            }
            what = (f"{label} q_len={q_len} {'paged' if paged else 'contiguous'} splits={splits} block_m={cfg.block_m} "
                    f"block_n={cfg.block_n} warps={cfg.num_warps}")
            try:
                kernel = triton.compile(
                    triton.compiler.ASTSource(fn, signature, constexprs=consts),
                    target=GPUTarget("cuda", args.arch, 32),
                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                )
            except Exception as exc:  # report every config, then fail
                print(f"FAIL {what}: {type(exc).__name__}: {str(exc)[:500]}")
                failed = True
                continue
            usage = ""
            if os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
                    handle.write(kernel.asm["cubin"])
                    handle.flush()
                    dump = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True, text=True)
                usage = next((line.strip() for line in dump.stdout.splitlines() if "REG:" in line), "")
                fields = dict(item.split(":", 1) for item in usage.split() if ":" in item)
                if fields.get("STACK", "0") != "0":
                    failed = True
                    usage += "  <- spills"
            print(f"ok   {what}: shared {kernel.metadata.shared} B; {' '.join(usage.split()[:2])}")
    merge = core._merge_splits_kernel
    consts = dict(W=512, BLOCK_W=64, NUM_SPLITS=33, BLOCK_S=64)
    types = dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr=f"*{args.dtype}")
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in merge.arg_names}
    try:
        triton.compile(triton.compiler.ASTSource(merge, signature, constexprs=consts),
                       target=GPUTarget("cuda", args.arch, 32), options=dict(num_warps=4))
        print("ok   merge kernel")
    except Exception as exc:
        print(f"FAIL merge kernel: {type(exc).__name__}: {str(exc)[:500]}")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
