"""Weights that are what the config says, and only finite numbers: refused in one line before any work.

transformers loads a checkpoint whose names do not match its config (Llama weights under `model_type: gemma2`)
with the missing weights randomly initialised and the others dropped, and a shard of garbage bytes with a valid
header gives NaN weights: both would run, convert and report numbers. Every command that reads a model (convert,
eval, finetune, export) checks, before its work:

* names: the weight files' tensor names (from the safetensors headers, nothing read) against those of the
  config's model class, built on the meta device (no memory);
* values: every floating tensor is scanned for NaN or infinity, one tensor (and one chunk of it) at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch

from gtakit.errors import GtakitError

_CHUNK = 1 << 24  # elements scanned at once: bounds the scan's extra memory to 16 MB


def _model_names(config: Any) -> tuple[set[str], list[str], str]:
    """(state-dict names of the config's causal-LM class without tied copies, patterns transformers ignores when
    they are in the file but not the model, the class's base-model prefix)."""
    from transformers import AutoModelForCausalLM

    import gtakit  # noqa: F401 - registers the gtakit architectures

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise GtakitError(f"model_type {getattr(config, 'model_type', None)!r} is not a causal language model "
                          "transformers can build; gtakit works on decoder-only LLMs") from None
    names = set(model.state_dict())
    tied = getattr(model, "_tied_weights_keys", None) or {}
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False):
        names -= set(tied)
    ignored = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return names, ignored, getattr(model, "base_model_prefix", "")


def check_weight_names(config: Any, found: Iterable[str], where: Path | str) -> None:
    """Refuse weight files whose tensor names are not exactly those the config's model has (missing ones would be
    randomly initialised, unexpected ones dropped)."""
    expected, ignored, prefix = _model_names(config)
    found = {name for name in found if "rotary_emb" not in name}
    if prefix and not any(name.startswith(prefix + ".") for name in found):  # checkpoints saved without it
        found = {f"{prefix}.{name}" if f"{prefix}.{name}" in expected else name for name in found}
    missing = sorted(expected - found)
    unexpected = sorted(name for name in found - expected if not any(re.search(p, name) for p in ignored))
    model_type = getattr(config, "model_type", None)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise GtakitError(f"{where}: the weights lack {missing[0]}{more} that a {model_type!r} model has; the "
                          "weights are for another architecture or incomplete (check config.json's model_type)")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise GtakitError(f"{where}: the weights hold {unexpected[0]}{more} that a {model_type!r} model does not "
                          "have; the weights are for another architecture (check config.json's model_type)")


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding NaN or infinity, or None."""
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            if not torch.isfinite(flat[start : start + _CHUNK]).all():
                return name
    return None


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: Path | str) -> None:
    """Refuse weights holding NaN or infinity (a corrupt shard, a diverged training run)."""
    name = first_non_finite(tensors)
    if name is not None:
        raise GtakitError(f"{where}: {name} holds NaN or infinite values; the checkpoint is corrupt (re-download "
                          "or re-create it)")


def check_reader(config: Any, reader: Any, where: Path | str, names: Iterable[str] | None = None) -> None:
    """Names (as the model class calls them: `names`, default the reader's) and values of a `WeightReader`."""
    check_weight_names(config, reader.keys() if names is None else names, where)
    check_finite(((name, reader.get(name)) for name in reader.keys()), where)
