"""End-to-end decoding speed: `generate` tokens/s of SmolLM2-135M (GQA) against its GTA and GLA conversions.

    python benchmarks/bench_generate.py                              # GPU: default grid, writes JSON
    python benchmarks/bench_generate.py --batch 1,32 --context 4096,16384 --new-tokens 64 --budget-gib 8
    python benchmarks/bench_generate.py --tiny                       # CPU smoke test (tiny random Llama)
    python benchmarks/bench_generate.py --cpu --targets source,gta,gla,mla --batch 1,4 --context 512,2048

CPU mode (`--cpu`, fp32): prefill and decode are timed apart and honestly: prefill = one forward over the prompt
(creating the cache), decode = `--new-tokens` greedy single-token steps on that cache, tokens/s = batch x steps /
their time. The models take turns within every repeat (so load changes hit all of them alike) and medians of
`--repeats` are reported, with the source measured in the same run.

For every model and batch x context: a random prompt of `context` tokens, greedy `generate` of `--new-tokens`
tokens (min = max, so every row runs them all). Decode tokens/s = batch * (N - 1) / (t(N) - t(1)), i.e. the
prefill (timed by the 1-token run) is taken out. Peak GPU memory is `torch.cuda.max_memory_allocated` over the
run. Then, per model and context, the largest batch (doubling search) whose prefill + a few decode steps stays
under `--budget-gib` (enforced with `torch.cuda.set_per_process_memory_fraction`). The conversions use the
data-free `svd` init: speed does not depend on conversion quality. gtakit models use `--backend` for decode
(auto = the Triton kernels on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="HF folder, .gguf or Hub id; default: the bundled SmolLM2-135M")
    p.add_argument("--targets", default="source,gta,gla", help="comma-separated: source, gta, gla, mla, ghla (converter defaults)")
    p.add_argument("--batch", type=_ints, default=[1, 16, 64])
    p.add_argument("--context", type=_ints, default=[4096, 16384])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (min is kept)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto", help="gtakit decode backend")
    p.add_argument("--budget-gib", type=float, default=16.0, help="memory budget of the largest-batch search")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--skip-fit", action="store_true", help="skip the largest-batch search")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/bench_generate.json"))
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny random Llama source, tiny shapes")
    p.add_argument("--cpu", action="store_true", help="CPU mode: fp32, prefill and decode timed apart, medians")
    return p


def _tiny_source_folder() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tempfile.mkdtemp(prefix="gtakit-bench-tiny-")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_models(args, device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (model on device, KV bytes per token over all layers)."""
    from gtakit.convert.pipeline import convert_in_memory
    from gtakit.convert import ConvertOptions
    from gtakit.io.source import open_source

    source = open_source(_tiny_source_folder() if args.tiny else args.source)
    cfg = source.config
    elsize = torch.empty((), dtype=dtype).element_size()
    models = {}
    for target in [t for t in args.targets.split(",") if t]:
        if target == "source":
            model = source.load_model()
            per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers
        else:
            model, _ = convert_in_memory(source, ConvertOptions(target=target, init="svd"))
            model.set_decode_backend(args.backend)
            per_token = model.kv_cache_elements_per_token()
        models[target] = (model.to(device=device, dtype=dtype).eval(), per_token * elsize)
    return models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _generate_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    _sync(prompt.device)
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(prompt.device)
    return time.perf_counter() - start


def time_decode(
    model, batch: int, context: int, new_tokens: int, vocab: int, device: torch.device, repeats: int = 2
) -> dict:
    prompt = torch.randint(3, vocab, (batch, context), device=device)
    _generate_seconds(model, prompt[:, :16], 2)  # warm-up: kernels compiled, allocator primed
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Min of a few runs each: the difference of two timings is sensitive to one-off stalls.
    prefill = min(_generate_seconds(model, prompt, 1) for _ in range(repeats))
    total = min(_generate_seconds(model, prompt, new_tokens) for _ in range(repeats))
    if total <= prefill:
        return {"prefill_s": round(prefill, 4), "decode_tok_s": "noisy (t(N) <= t(1))"}
    decode = total - prefill
    return {
        "prefill_s": round(prefill, 4),
        "decode_tok_s": round(batch * (new_tokens - 1) / decode, 1),
        "ms_per_step": round(1e3 * decode / (new_tokens - 1), 3),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else "",
    }


@torch.no_grad()
def split_seconds(model, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `steps` greedy single-token steps on the prefilled cache)."""
    from gtakit.models import CACHE_FIELD, output_cache

    start = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
        token = out.logits[:, -1:].argmax(-1)
    return prefill, time.perf_counter() - start


def cpu_rows(models: dict, args) -> list[dict]:
    """Interleaved repeats (every model once per repeat), medians, the source in the same run."""
    import statistics

    rows = []
    for batch in args.batch:
        for context in args.context:
            vocab = next(iter(models.values()))[0].config.vocab_size
            prompt = torch.randint(3, vocab, (batch, context), generator=torch.Generator().manual_seed(context))
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
            for name, (model, _) in models.items():  # warm-up
                split_seconds(model, prompt[:, :16], 2)
            for _ in range(args.repeats):
                for name, (model, _) in models.items():
                    times[name].append(split_seconds(model, prompt, args.new_tokens))
            base = None
            for name, (model, kv_bytes) in models.items():
                prefill = statistics.median(t[0] for t in times[name])
                decode = statistics.median(t[1] for t in times[name])
                row = {"model": name, "kv_bytes_per_token": kv_bytes, "batch": batch, "context": context,
                       "prefill_s": round(prefill, 3), "decode_tok_s": round(batch * args.new_tokens / decode, 2),
                       "ms_per_step": round(1e3 * decode / args.new_tokens, 1)}
                if name == "source":
                    base = row
                row["_prefill"], row["_decode"] = prefill, decode
                if base is not None:
                    row["speedup"] = f"{base['_decode'] / decode:.2f}x"
                    row["prefill_vs_source"] = f"{prefill / base['_prefill']:.2f}x"
                rows.append(row)
                print(markdown_table([row], CPU_COLUMNS).splitlines()[-1], flush=True)
    for row in rows:
        del row["_prefill"], row["_decode"]
    return rows


def largest_batch(model, context: int, vocab: int, device: torch.device, max_batch: int) -> int:
    """Largest power-of-two batch whose prefill + 4 decode steps run inside the memory budget (0: none)."""
    best, batch = 0, 1
    while batch <= max_batch:
        try:
            _generate_seconds(model, torch.randint(3, vocab, (batch, context), device=device), 4)
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        best, batch = batch, batch * 2
    return best


COLUMNS = [("model", "model"), ("kv_bytes_per_token", "KV bytes/token"), ("batch", "batch"), ("context", "context"),
           ("decode_tok_s", "decode tok/s"), ("ms_per_step", "ms/step"), ("speedup", "vs source"),
           ("prefill_s", "prefill s"), ("peak_gib", "peak GiB")]


CPU_COLUMNS = [("model", "model"), ("kv_bytes_per_token", "KV bytes/token"), ("batch", "batch"),
               ("context", "context"), ("prefill_s", "prefill s"), ("prefill_vs_source", "prefill vs source"),
               ("decode_tok_s", "decode tok/s"), ("ms_per_step", "ms/step"), ("speedup", "decode vs source")]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu:
        models = load_models(args, torch.device("cpu"), torch.float32)
        rows = cpu_rows(models, args)
        table = markdown_table(rows, CPU_COLUMNS)
        print("\n" + table)
        meta = {"command": " ".join(sys.argv), "device": "cpu", "threads": torch.get_num_threads(),
                "torch": torch.__version__, "dtype": "float32", "new_tokens": args.new_tokens,
                "repeats": args.repeats}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=1))
        print(f"wrote {args.json}")
        return 0
    if args.tiny:
        device, dtype = torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32
        args.batch, args.context, args.new_tokens = [2], [32], 8
        args.skip_fit = args.skip_fit or not torch.cuda.is_available()
    elif not torch.cuda.is_available():
        print("error: bench_generate needs a CUDA GPU (use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    models = load_models(args, device, dtype)
    rows, base = [], {}
    for name, (model, kv_bytes) in models.items():
        vocab = model.config.vocab_size
        for batch in args.batch:
            for context in args.context:
                row = {"model": name, "kv_bytes_per_token": kv_bytes, "batch": batch, "context": context}
                try:
                    row.update(time_decode(model, batch, context, args.new_tokens, vocab, device, args.repeats))
                except torch.OutOfMemoryError:
                    row["decode_tok_s"] = "OOM"
                if name == "source" and isinstance(row.get("decode_tok_s"), float):
                    base[(batch, context)] = row["decode_tok_s"]
                if isinstance(row.get("decode_tok_s"), float) and (batch, context) in base:
                    row["speedup"] = f"{row['decode_tok_s'] / base[(batch, context)]:.2f}x"
                rows.append(row)
                print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    fits = []
    if not args.skip_fit:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
        for model, _ in models.values():  # only the measured model's weights count against the budget
            model.to("cpu")
        for name, (model, kv_bytes) in models.items():
            model.to(device)
            for context in args.context:
                best = largest_batch(model, context, model.config.vocab_size, device, args.max_batch)
                fits.append({"model": name, "context": context, "budget_gib": args.budget_gib, "max_batch": best,
                             "max_batch_x_context": best * context})
                print(fits[-1], flush=True)
            model.to("cpu")
            torch.cuda.empty_cache()
    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    if fits:
        print("\n" + markdown_table(fits, [("model", "model"), ("context", "context"), ("budget_gib", "budget GiB"),
                                           ("max_batch", "largest batch"), ("max_batch_x_context", "batch x context")]))
    meta = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "dtype": str(dtype), "backend": args.backend}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "fits": fits, "table": table}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
