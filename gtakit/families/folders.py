"""Checks of a local model folder before it is loaded (eval, finetune, export): a causal LM whose weights match
its config, as the source family's model class names them, and are finite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gtakit.errors import GtakitError
from gtakit.io.source import read_config, weight_reader
from gtakit.io.weights import check_reader

from . import BY_MODEL_TYPE


def check_causal_lm(config: Any, where: Path | str) -> None:
    """Refuse encoders (BERT and the like) by the config alone: transformers maps several of them to a causal-LM
    class (BertLMHeadModel) that then fails deep inside a forward pass or attends both ways and gives numbers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

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
    family = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        return reader.keys()
    every_layer = frozenset(range(config.num_hidden_layers))
    return [name for name, _ in family.passthrough(reader, config, every_layer)]
