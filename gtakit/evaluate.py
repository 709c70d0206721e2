"""Perplexity over non-overlapping windows and measured KV-cache bytes per token (`gtakit eval`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError
from gtakit.models import output_cache


def load_model(model: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an HF folder (gtakit or source), a .gguf file or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gtakit  # noqa: F401 - registers the gtakit architectures
    from gtakit.convert.source import open_source, read_config

    path = Path(model).expanduser()
    try:
        # The tokenizer first: it is cheap, and a missing one should fail before minutes of loading weights.
        if path.is_dir() and str(read_config(path).get("model_type", "")).startswith("gtakit_"):
            tokenizer = AutoTokenizer.from_pretrained(path)
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tokenizer
        source = open_source(model)
        tokenizer = source.load_tokenizer()
        return source.load_model(dtype), tokenizer
    except GtakitError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken folder (config, truncated weights, no tokenizer): one line
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise GtakitError(f"cannot load {model}: {first}") from None


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    max_tokens: int | None = None,
    window: int = 1024,
    progress: bool = False,
) -> dict:
    """Perplexity of `text` over non-overlapping windows of `window` tokens (each window scored on its own)."""
    if window < 2:
        raise GtakitError("--window must be at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    num_windows = len(ids) // window
    if num_windows == 0:
        raise GtakitError(f"the text has {len(ids)} tokens, fewer than one window of {window}; lower --window")
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    for index in tqdm(range(num_windows), desc="perplexity", disable=not progress):
        chunk = ids[index * window : (index + 1) * window].unsqueeze(0).to(device)
        logits = model(chunk, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_count += window - 1
    return {
        "perplexity": math.exp(total_nll / total_count),
        "nll": total_nll / total_count,
        "tokens": num_windows * window,
        "windows": num_windows,
        "window": window,
    }


@torch.no_grad()
def kv_bytes_per_token(model, tokens: int = 8) -> dict:
    """Measured cache size per token (all layers) after a short forward pass."""
    device = next(model.parameters()).device
    ids = torch.full((1, tokens), 1, dtype=torch.long, device=device)
    cache = output_cache(model(ids, use_cache=True))
    total_bytes, total_elements = 0, 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total_bytes += tensor.numel() * tensor.element_size()
                total_elements += tensor.numel()
    return {"bytes_per_token": total_bytes / tokens, "elements_per_token": total_elements / tokens}
