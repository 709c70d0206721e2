"""Peak resident memory of `gtakit convert` on a synthetic multi-GB checkpoint (streaming check).

    python benchmarks/convert_memory.py [--layers 8] [--hidden 2048] [--intermediate 8192] [--dtype float32]

Writes a random Llama checkpoint shard by shard (never whole in memory), converts it in a child process
(`gtakit convert --to gla`) while sampling the child's RSS, and reports peak RSS against the checkpoint size.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402


def write_synthetic(folder: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int,
                    dtype: torch.dtype) -> int:
    from transformers import LlamaConfig

    head_dim = hidden // heads
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, dtype=str(dtype).split(".")[-1]
                ).save_pretrained(folder)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    def rand(*shape):
        return (torch.randn(*shape) * 0.02).to(dtype)

    count = layers + 1
    shard(f"model-00001-of-{count + 1:05d}.safetensors",
          {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"model-{i + 2:05d}-of-{count + 1:05d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        })
    shard(f"model-{count + 1:05d}-of-{count + 1:05d}.safetensors", {"lm_head.weight": rand(vocab, hidden)})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--to", default="gla")
    parser.add_argument("--json", default="benchmarks/out/convert_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        size = write_synthetic(src, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads,
                               args.vocab, getattr(torch, args.dtype))
        cmd = ["gtakit", "convert", str(src), "--to", args.to, "-o", str(Path(tmp) / "out"), "--quiet",
               "--max-shard-size", "1GB"]
        started = time.time()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        output = child.stdout.read()
        if child.returncode != 0:
            raise SystemExit(f"conversion failed:\n{output}")
        wall = time.time() - started
        out_size = sum(p.stat().st_size for p in (Path(tmp) / "out").glob("*.safetensors"))
    row = {
        "checkpoint_gb": round(size / 2**30, 2),
        "output_gb": round(out_size / 2**30, 2),
        "peak_rss_gb": round(peak / 2**30, 2),
        "peak_over_checkpoint": round(peak / size, 2),
        "wall_s": round(wall, 1),
        "target": args.to,
    }
    columns = [("checkpoint_gb", "source checkpoint GB"), ("output_gb", "output GB"), ("peak_rss_gb", "peak RSS GB"),
               ("peak_over_checkpoint", "peak / source size"), ("wall_s", "wall s"), ("target", "target")]
    table = markdown_table([row], columns)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "row": row, "table": table}, indent=2))


if __name__ == "__main__":
    main()
