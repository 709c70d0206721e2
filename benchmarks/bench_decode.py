"""Decode-attention kernel benchmark (GTA / GLA-2 / MLA vs SDPA on GQA and PyTorch MLA); see gtakit/decode_bench.py.

GPU:  python benchmarks/bench_decode.py                      # full grid, writes benchmarks/out/bench_decode.json
CPU:  python benchmarks/bench_decode.py --dry-run | --interpret
"""

from __future__ import annotations

import sys

from gtakit.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
