"""Loading what `gtakit eval` measures (converted folders and sources alike), and the measured KV-cache size."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gtakit.errors import GtakitError
from gtakit.models import output_cache


def load_model(model: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an HF folder (gtakit or source), a .gguf file, a Hub id, or None for the bundled
    SmolLM2-135M GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gtakit  # noqa: F401 - registers the gtakit architectures
    from gtakit.io.source import open_source, read_config

    path = Path(model).expanduser() if model is not None else None
    try:
        # The tokenizer first: it is cheap, and a missing one should fail before minutes of loading weights.
        if path is not None and path.is_dir() and read_config(path).get("model_type") == "gtakit":
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


def conversion_source(folder: str | Path) -> str | None:
    """What a converted folder was made from (its conversion.json), as `load_model` takes it: a path or Hub id,
    or None for the bundled SmolLM2 GGUF."""
    from gtakit.io.source import SMOLLM2_GGUF

    report_path = Path(folder).expanduser() / "conversion.json"
    if not report_path.is_file():
        raise GtakitError(f"{report_path} does not exist (it is written by gtakit convert); name the source model")
    source = json.loads(report_path.read_text())["source"]
    name = source["name"]
    if source["kind"] == "gguf" and not Path(name).exists() and name == SMOLLM2_GGUF:
        return None
    if source["kind"] == "gguf" and not Path(name).exists() and Path(source.get("path", "")).is_file():
        return source["path"]  # a GGUF given by a path relative to another working directory
    return name


def check_eval_models(model: str | None, against: str | None = None) -> None:
    """`gtakit eval`, before any work: MODEL's and --against's weights (names and values), and that both score the
    same vocabulary (KL and top-1 agreement compare their next-token distributions token by token)."""
    from gtakit.families.folders import check_model_folder  # noqa: PLC0415
    from gtakit.io.source import vocab_size  # noqa: PLC0415

    check_model_folder(model)
    if against is None:
        return
    source = conversion_source(model) if against == "source" else against
    check_model_folder(source, "--against")
    mine, theirs = vocab_size(model), vocab_size(source)
    if mine and theirs and mine != theirs:
        raise GtakitError(f"--against {against} has a vocabulary of {theirs} tokens and {model} one of {mine}; "
                          "compare models that share a tokenizer")
