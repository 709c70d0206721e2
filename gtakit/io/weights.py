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


def check_causal_lm(config: Any, where: Path | str) -> None:
    """Refuse encoders (BERT and the like) by the config alone: transformers maps several of them to a causal-LM
    class (BertLMHeadModel) that then fails deep inside a forward pass or attends both ways and gives numbers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    from gtakit.families import BY_MODEL_TYPE

    model_type = getattr(config, "model_type", None)
    if model_type == "gtakit" or model_type in BY_MODEL_TYPE:
        return
    architectures = getattr(config, "architectures", None) or []
    if architectures:  # what the checkpoint was saved as (BertForMaskedLM, BertModel) decides
        causal = any(name in set(CAUSAL.values()) for name in architectures)
    else:  # no record: a type with a masked-LM head is an encoder that merely has a causal-LM variant
        causal = model_type in CAUSAL and model_type not in MASKED
    if not causal:
        saved = f" saved as {', '.join(architectures)}" if architectures else ""
        raise GtakitError(f"{where} (model_type {model_type!r}{saved}) is not a causal language model; gtakit "
                          "supports decoder-only LLMs")


def check_model_folder(path: str | Path | None, what: str = "") -> None:
    """Before loading a local HF folder (eval, finetune, export): refuse weights that do not match its config or
    are not finite. Other sources (.gguf, Hub ids, None) pass: their loaders check them or gtakit convert does."""
    from transformers import AutoConfig

    from gtakit.io.source import read_config, weight_reader

    if path is None:
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    label = f"{what} {folder}".strip()
    read_config(folder)  # a one-line refusal of a missing or broken config.json
    import gtakit  # noqa: F401 - registers the gtakit architectures

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise GtakitError(f"{folder / 'config.json'} is not a valid config: {str(err).splitlines()[0]}") from None
    check_causal_lm(config, label)
    reader = weight_reader(folder, label)
    check_reader(config, reader, label, _model_side_names(config, reader))


def _model_side_names(config: Any, reader: Any) -> list[str]:
    """The reader's tensor names as the model class calls them (a source family renames some, and fuses MoE
    experts stored one by one)."""
    from gtakit.families import BY_MODEL_TYPE

    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        return reader.keys()
    every_layer = frozenset(range(config.num_hidden_layers))
    return [name for name, _ in family.passthrough(reader, config, every_layer)]


def vocab_size(path: str | Path | None) -> int | None:
    """A local model folder's vocabulary size from its config.json (None for other sources)."""
    if path is None or not Path(path).expanduser().is_dir():
        return None
    from gtakit.io.source import read_config

    raw = read_config(Path(path).expanduser())
    return raw.get("vocab_size") or (raw.get("text_config") or {}).get("vocab_size")


def check_eval_models(model: str | None, against: str | None = None) -> None:
    """`gtakit eval`, before any work: MODEL's and --against's weights (names and values), and that both score the
    same vocabulary (KL and top-1 agreement compare their next-token distributions token by token)."""
    check_model_folder(model)
    if against is None:
        return
    from gtakit.evaluate.loading import conversion_source

    source = conversion_source(model) if against == "source" else against
    check_model_folder(source, "--against")
    mine, theirs = vocab_size(model), vocab_size(source)
    if mine and theirs and mine != theirs:
        raise GtakitError(f"--against {against} has a vocabulary of {theirs} tokens and {model} one of {mine}; "
                          "compare models that share a tokenizer")
