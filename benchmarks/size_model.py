"""Memory and time model of `gtakit convert` for the sizes users bring (1B / 8B / 70B), checked against runs.

    python benchmarks/size_model.py                                   # the computed table
    python benchmarks/size_model.py --measured benchmarks/out/qwen25/results.json,...   # beside measured runs

What is resident at the peak of a calibrated conversion (the pipeline streams: one decoder layer at a time):

* runtime: Python, torch and transformers (measured: ~0.55 GB);
* source: a safetensors folder is read tensor by tensor through `safe_open` (the pages of the layer being read);
  a GGUF file is dequantised whole by transformers' loader, so it costs 4 bytes per parameter at once;
* the layer set: one source decoder layer in fp32 on the calibration device, the hidden states of every
  calibration token (T x D fp32, kept on the host), the float64 attention-input moment (D^2), the refit's float64
  normal equations ((H d)^2 + D H d), the float64 working copy of the attention weights the form's closed form
  decomposes, and one micro-batch's activations (2048 tokens on the CPU, 16,384 on a GPU);
* the embedding matrix in the checkpoint's dtype while the calibration embeds the tokens (only the gathered rows
  are cast to fp32; freed afterwards), and the output shard being filled (`--max-shard-size`, 5 GB by default)
  while writing.

Time: calibration runs each decoder layer over the T tokens about twice (the statistics pass, the refit's
attention pairs, which also advance the hidden states); a forward costs 2 x (layer parameters) FLOP per token plus
the causal attention, 2 x L x H d FLOP per token at sequence length L. At a sustained GEMM rate R (measured on
this CPU: ~100 GFLOP/s fp32; an H100 sustains ~400 TFLOP/s bf16 and ~50 TFLOP/s fp32 on these shapes) the time is
their sum over layers divided by R. The numbers are computed, not measured, wherever no run is listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402
from qwen25 import SIZE_MODEL  # noqa: E402

GB = 1e9
RUNTIME_GB = 0.55
GGUF_BYTES_PER_PARAM = 0.78  # Qwen2.5-Coder-0.5B Q4_K_M: 491 MB for 630M parameters


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def attention_params(self) -> int:
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def layer_params(self) -> int:
        return self.attention_params + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)


# Public configs (config.json of each checkpoint).
SHAPES = {
    "SmolLM2-135M": Shape("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152, True),
    "Gemma-3-270M": Shape("Gemma-3-270M", 640, 18, 4, 1, 256, 2048, 262144, True),
    "Qwen2.5-0.5B": Shape("Qwen2.5-0.5B", 896, 24, 14, 2, 64, 4864, 151936, False),
    "Llama-3.2-1B": Shape("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, True),
    "Llama-3.1-8B": Shape("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, False),
    "Llama-3.1-70B": Shape("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256, False),
}


def layer_set_gb(shape: Shape, tokens: int, micro_batch: int) -> dict[str, float]:
    """Bytes (GB) of what one converted layer needs resident at once."""
    qdim = shape.heads * shape.head_dim
    activations = micro_batch * (4 * shape.hidden + 2 * shape.intermediate + 3 * qdim) * 4
    return {
        "layer_fp32": 4 * shape.layer_params / GB,
        "hidden_states": 4 * tokens * shape.hidden / GB,
        "moments": 8 * (shape.hidden**2 + qdim**2 + shape.hidden * qdim) / GB,
        "decomposition": 8 * shape.attention_params / GB,
        "activations": activations / GB,
    }


def peak_gb(shape: Shape, tokens: int, source: str, device: str, shard_gb: float = 5.0) -> dict[str, float]:
    """Predicted peak host and device memory of one conversion.

    safetensors: the layer set plus the larger of the embedding read for calibration and the output shard being
    filled (pass-through tensors are copies read from the files). GGUF: transformers' loader holds the whole
    model in fp32 and keeps the file mapped (~0.78 bytes per parameter at Q4_K_M); the output's pass-through
    tensors are that model's own, so the shard adds nothing."""
    micro = 16384 if device == "cuda" else 2048
    parts = layer_set_gb(shape, tokens, micro)
    needed = sum(parts.values())
    on_device = parts["layer_fp32"] + parts["activations"] if device == "cuda" else 0.0
    if source == "gguf":
        extra = (4 + GGUF_BYTES_PER_PARAM) * shape.params / GB
    else:
        embedding = 2 * shape.vocab * shape.hidden / GB  # read in the checkpoint's dtype, rows gathered first
        extra = max(embedding, min(shard_gb, 2 * shape.params / GB))
    host = RUNTIME_GB + needed - on_device + extra
    return {"layer_set": needed, "host": host, "device": on_device, "host_vs_layer_set": (host - RUNTIME_GB + on_device) / needed}


def seconds(shape: Shape, tokens: int, seq_len: int, flops_per_s: float, passes: float = 2.0) -> float:
    per_token = 2 * shape.layer_params + 2 * seq_len * shape.heads * shape.head_dim
    return passes * shape.layers * per_token * tokens / flops_per_s


def table(tokens: int, seq_len: int) -> list[dict]:
    rows = []
    for shape in SHAPES.values():
        for source, device, rate in (("safetensors", "cpu", 100e9), ("safetensors", "cuda", 50e12), ("gguf", "cpu", 100e9)):
            peak = peak_gb(shape, tokens, source, device)
            rows.append({"model": shape.name, "params B": f"{shape.params / 1e9:.2f}", "source": source,
                         "calibration": device, "layer set GB": f"{peak['layer_set']:.2f}",
                         "host peak GB": f"{peak['host']:.1f}", "device peak GB": f"{peak['device']:.1f}",
                         "host / layer set": f"{peak['host_vs_layer_set']:.2f}",
                         "time": _duration(seconds(shape, tokens, seq_len, rate))})
    return rows


def training_gb(shape: Shape, mode: str, shards: int, teacher_bytes: int = 2) -> float:
    """Per-GPU memory of `gtakit finetune` before activations: trainable parameters cost 16 bytes each (fp32
    weight, gradient and AdamW's two moments), frozen ones 4 (fp32); FSDP (shards > 1) splits both; the frozen
    teacher (bf16 by default) is loaded whole on every rank."""
    trainable = {"full": shape.params, "attention": shape.layers * shape.attention_params, "lora": 0}[mode]
    frozen = shape.params - trainable
    return (16 * trainable + 4 * frozen) / shards / GB + teacher_bytes * shape.params / GB


def training_table() -> list[dict]:
    rows = []
    for name in ("Llama-3.2-1B", "Llama-3.1-8B", "Llama-3.1-70B"):
        shape = SHAPES[name]
        for mode in ("full", "attention", "lora"):
            row = {"model": name, "train.mode": mode}
            for label, shards in (("1 GPU or DDP", 1), ("FSDP 8 GPUs", 8), ("FSDP 16 GPUs (2 machines)", 16)):
                row[label] = f"{training_gb(shape, mode, shards):.0f}"
            rows.append(row)
    return rows


def _duration(value: float) -> str:
    return f"{value / 3600:.1f} h" if value > 5400 else f"{value / 60:.1f} min"


def measured_rows(paths: list[str]) -> list[dict]:
    """Peak RSS and wall time of conversion steps recorded by qwen25.py (`results.json`) beside the model."""
    rows = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        for name, step in results.items():
            meta = step.get("size_model")
            if meta is None and name in SIZE_MODEL:  # runs recorded before the driver tagged them
                meta = dict(zip(("model", "source"), SIZE_MODEL[name]), tokens=_calib_tokens(step["command"]))
            if not meta or step.get("rc") != 0:
                continue
            shape = SHAPES[meta["model"]]
            predicted = peak_gb(shape, meta["tokens"], meta["source"], "cpu")
            rows.append({"run": name, "model": shape.name, "source": meta["source"], "tokens": meta["tokens"],
                         "measured peak GB": step["peak_rss_gb"], "predicted GB": f"{predicted['host']:.2f}",
                         "measured s": step["seconds"],
                         "predicted s": f"{seconds(shape, meta['tokens'], meta.get('seq_len', 2048), 100e9):.0f}"})
    return rows


def _calib_tokens(command: str) -> int:
    words = command.split()
    return int(words[words.index("--calib-tokens") + 1]) if "--calib-tokens" in words else 65536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (the converter's default)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--measured", default="", help="comma-separated results.json files of qwen25.py")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/size_model.json"))
    args = parser.parse_args()
    rows = table(args.tokens, args.seq_len)
    print(markdown_table(rows, [(key, key) for key in rows[0]]))
    training = training_table()
    print()
    print(markdown_table(training, [(key, key) for key in training[0]]))
    measured = measured_rows([p for p in args.measured.split(",") if p])
    if measured:
        print()
        print(markdown_table(measured, [(key, key) for key in measured[0]]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"computed": rows, "training": training, "measured": measured}, indent=1))


if __name__ == "__main__":
    main()
