"""Which layers and heads carry passkey retrieval, and what a conversion does to them.

    python benchmarks/retrieval_heads.py --length 4096 --depths 0.25,0.75 --keys 2 --targets mla,gla,gta

For each passkey prompt (the `gtakit eval --passkey` prompt), the attention of the token that must produce the key's
first digit is captured in every layer and head, and its mass on the needle (the sentence holding the key) is
summed. The source and each conversion (the default pipeline: aware init and output refit, calibrated on the first
`--calib-chars` characters of WikiText-2) are compared head by head; the heads the source uses for retrieval are
those with the largest needle mass. Also reported: the log-probability of the key given the prompt (teacher
forced) and whether greedy decoding reproduces it. Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import calibration_and_eval_text, markdown_table  # noqa: E402
from convert_quality import budget_settings  # noqa: E402

from gtakit.convert import ConvertOptions  # noqa: E402
from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.evaluate.passkey import build_prompt  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402

_captured: list[torch.Tensor] = []
_probe_row: list[int] = [-1]


@contextmanager
def last_row_attention(row: int):
    """Record, for every SDPA call (one per layer), the attention probabilities of query `row` `[B, H, T]`."""
    original = F.scaled_dot_product_attention

    def probe(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa)
        q = query[:, :, row : row + 1 if row != -1 else None].float()
        k = key.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        stop = (row % query.shape[2]) + 1 + (key.shape[2] - query.shape[2])  # causal: keys up to the row
        scores = (q @ k[:, :, :stop].transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            mask = attn_mask[..., row : row + 1 if row != -1 else None, :stop]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        _captured.append(torch.softmax(scores, dim=-1)[:, :, 0].cpu())
        return out

    F.scaled_dot_product_attention = probe
    torch.nn.functional.scaled_dot_product_attention = probe
    try:
        yield _captured
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original
        _captured.clear()


def needle_span(ids: torch.Tensor, key_ids: list[int]) -> tuple[int, int]:
    """First to last token of the key's two occurrences in the prompt."""
    seq, n = ids.tolist(), len(key_ids)
    hits = [i for i in range(len(seq) - n + 1) if seq[i : i + n] == key_ids]
    if not hits:
        raise RuntimeError("the key's tokens were not found in the prompt")
    return hits[0], hits[-1] + n


@torch.no_grad()
def probe_prompt(model, tokenizer, length: int, depth: float, key: str) -> dict:
    prompt = build_prompt(tokenizer, length, depth, key)
    key_ids = tokenizer(" " + key, add_special_tokens=False).input_ids
    ids = torch.cat([prompt.ids[0], torch.tensor(key_ids)])
    last = prompt.ids.shape[1] - 1
    digits = tokenizer(key, add_special_tokens=False).input_ids
    start, stop = needle_span(prompt.ids[0], digits[-3:])
    with last_row_attention(last) as rows:
        logits = model(ids[None], use_cache=False).logits[0].float()
        mass = torch.stack([r[0, :, max(0, start - 8) : stop].sum(-1) for r in rows])  # [layers, heads]
    logp = torch.log_softmax(logits[last:-1], -1)
    targets = ids[last + 1 :]
    return {"mass": mass, "key_logp": float(logp.gather(-1, targets[:, None]).sum()),
            "greedy": bool((logp.argmax(-1) == targets).all()), "needle": (start, stop), "tokens": len(ids)}


def probe_model(model, tokenizer, lengths, depths, keys, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    masses, logps, hits = [], [], []
    for length in lengths:
        for depth in depths:
            for _ in range(keys):
                key = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
                row = probe_prompt(model, tokenizer, length, depth, key)
                masses.append(row["mass"])
                logps.append(row["key_logp"])
                hits.append(row["greedy"])
    return {"mass": torch.stack(masses).mean(0), "key_logp": sum(logps) / len(logps), "accuracy": sum(hits) / len(hits),
            "trials": len(hits)}


def conversion_settings(name: str, half: int, head_dim: int) -> dict:
    if name == "gta":
        return {"target": "gta"}
    latents = 3 if name == "gla" else 1
    setting = budget_settings(name, half, latents, head_dim)
    if name == "mla":
        setting.pop("latent_heads")
    return setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-test.txt"))
    parser.add_argument("--calib-chars", type=int, default=300_000)
    parser.add_argument("--calib-tokens", type=int, default=16_384)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--depths", default="0.25,0.75")
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--targets", default="mla")
    parser.add_argument("--top", type=int, default=12, help="retrieval heads listed")
    parser.add_argument("--option", action="append", default=[], help="extra ConvertOptions field=value")
    parser.add_argument("--json", default="benchmarks/out/retrieval_heads.json")
    args = parser.parse_args()
    calib_path, _ = calibration_and_eval_text(args.text, args.json, args.calib_chars, 400_000)
    source = open_source(None)
    tokenizer = source.load_tokenizer()
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    started = time.time()
    results = {"source": probe_model(source.load_model(), tokenizer, lengths, depths, args.keys)}
    print(f"source: {time.time() - started:.0f} s", flush=True)
    d, G = source.config.head_dim, source.config.num_key_value_heads
    extra = dict(item.split("=", 1) for item in args.option)
    for name in args.targets.split(","):
        started = time.time()
        options = ConvertOptions(init="aware", calib=str(calib_path), calib_tokens=args.calib_tokens,
                                 calib_seq_len=args.calib_seq_len, **conversion_settings(name, G * d, d))
        for field, value in extra.items():
            setattr(options, field, type(getattr(options, field))(value) if getattr(options, field) is not None
                    else value)
        model, _ = convert_in_memory(source, options)
        results[name] = probe_model(model, tokenizer, lengths, depths, args.keys)
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
        del model
    report(results, args)


def report(results: dict, args) -> None:
    src = results["source"]["mass"]
    layers, heads = src.shape
    order = torch.argsort(src.flatten(), descending=True)[: args.top]
    rows = []
    for flat in order.tolist():
        layer, head = divmod(flat, heads)
        row = {"head": f"L{layer}.h{head}", "source": f"{float(src[layer, head]):.3f}"}
        row.update({name: f"{float(r['mass'][layer, head]):.3f}" for name, r in results.items() if name != "source"})
        rows.append(row)
    columns = [("head", "layer.head"), ("source", "source")] + [(n, n) for n in results if n != "source"]
    print(markdown_table(rows, columns))
    summary = [{"model": name, "accuracy": f"{r['accuracy']:.0%}", "key_logp": f"{r['key_logp']:.2f}",
                "top_mass": f"{float(r['mass'].flatten()[order].mean()):.3f}"} for name, r in results.items()]
    print(markdown_table(summary, [("model", "model"), ("accuracy", "greedy key"), ("key_logp", "key log p"),
                                   ("top_mass", f"mean needle mass, source's top {args.top} heads")]))
    payload = {"command": " ".join(sys.argv), "summary": summary, "heads": rows,
               "mass": {name: r["mass"].tolist() for name, r in results.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
