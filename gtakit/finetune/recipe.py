"""Uptraining recipe: a YAML file validated against dataclasses, with dotted `key=value` overrides.

Every field carries its help text in `metadata["help"]`; unknown keys, wrong types and bad choices are
refused before anything is loaded, with one line naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import glob
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from gtakit.errors import GtakitError
from gtakit.ranges import Range, bounds, check_ranges


def _f(default: Any, help: str, range: Range | None = None, **kwargs: Any) -> Any:  # noqa: A002
    """A recipe field with its help (`help` reads best in the schema) and, for a number, its valid range (checked
    by `validate` for every field alike)."""
    metadata = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelSection:
    path: str = _f("", "Converted model folder (the OUT of `gtakit convert`), or any gtakit HF folder / Hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "dtype the trainable copy is loaded in; keep float32 and use train.precision for speed."
    )


@dataclass
class TeacherSection:
    model: str | None = _f(
        None,
        "Teacher for distillation: 'source' (the model the converted folder was made from, read from its "
        "conversion.json), a folder, a .gguf file or a Hub id. Needed when loss.kind is distill or mix.",
    )
    device: str = _f("auto", "Device of the frozen teacher: auto (same as the student), cpu, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the teacher.")


@dataclass
class DataSection:
    train: list[str] = _f(
        [],
        "Training text: files (plain text = one document per file; .jsonl/.json = one document per line; "
        ".parquet = one per row; globs allowed) or a datasets name 'hf:NAME[:CONFIG[:SPLIT]]'.",
    )
    eval: list[str] = _f(
        [], "Evaluation text in the same forms; empty = hold out eval.sequences packed sequences of the train data."
    )
    text_field: str = _f("text", "Field holding the text in JSON lines, parquet and datasets rows.")
    max_chars: int | None = _f(None, "Read at most this many characters of training text (None = all).", bounds(1))
    eval_sequences: int = _f(
        16, "Packed sequences used for evaluation (held out from train when data.eval is empty).", bounds(1))
    cache_dir: str | None = _f(
        None, "Where the tokenised, packed data is cached (default: the checkpoint folder); tokenised once."
    )
    teacher_samples: int = _f(
        0, "Tokens of text the teacher writes itself (sampled at temperature 1 from its BOS token, no prompt), "
        "packed after data.train's rows; 0 = none. Distillation on the teacher's own distribution also reaches "
        "domains data.train lacks (SmolLM2 MLA 50%, 64k tokens: KL to the source on held-out code 0.63 against "
        "0.91 after WikiText-2, benchmarks/RESULTS.md). Needs teacher.model; generated once, cached with the data.",
        bounds(0))
    sample_length: int = _f(512, "Tokens per teacher sample at most (a sample also ends at the teacher's EOS).",
                            bounds(1))
    sample_batch: int = _f(16, "Teacher samples generated per batch.", bounds(1))


@dataclass
class TrainSection:
    mode: Literal["full", "attention", "lora"] = _f(
        "full", "full: every parameter trains; attention: only the converted attention; lora: peft adapters."
    )
    tokens: int = _f(1_000_000, "Token budget: optimiser steps = ceil(tokens / tokens per step).", bounds(1))
    max_steps: int | None = _f(None, "Optimiser steps; overrides train.tokens when set.", bounds(1))
    seq_len: int = _f(1024, "Tokens per packed training sequence.", bounds(2))
    micro_batch: int = _f(4, "Sequences per forward pass and process.", bounds(1))
    grad_accum: int = _f(1, "Micro-batches accumulated per optimiser step.", bounds(1))
    lr: float = _f(1e-4, "Peak learning rate (AdamW).", bounds(0, low_open=True))
    min_lr_ratio: float = _f(0.1, "Cosine schedule floor as a fraction of lr.", bounds(0, 1))
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate schedule after warm-up.")
    warmup_steps: int | None = _f(None, "Linear warm-up steps (default: 5% of the steps).", bounds(0))
    weight_decay: float = _f(0.0, "AdamW weight decay.", bounds(0))
    betas: list[float] = _f([0.9, 0.95], "AdamW betas.", bounds(0, 1, high_open=True))
    grad_clip: float | None = _f(
        1.0, "Clip the global gradient norm to this (None = no clipping).", bounds(0, low_open=True))
    precision: Literal["no", "bf16", "fp16"] = _f("no", "Mixed precision through accelerate (autocast).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    seed: int = _f(0, "Seed of the data order, LoRA init and dropout.", bounds(0))


@dataclass
class LossSection:
    kind: Literal["ce", "distill", "mix"] = _f(
        "ce", "ce: next-token cross-entropy; distill: KL to the teacher's logits; mix: weighted sum of both."
    )
    distill_weight: float = _f(0.5, "mix: loss = (1 - w) * CE + w * KD.", bounds(0, 1))
    temperature: float = _f(
        1.0, "Distillation temperature; the KL is scaled by T^2 so gradients keep their size.", bounds(0, low_open=True))
    attention_weight: float = _f(
        0.0, "distill/mix: add this times the mean over layers of the relative squared error between each layer's "
        "attention output and the teacher's (from the teacher's forward the logits need anyway); 0 = off.",
        bounds(0))


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA rank.", bounds(1))
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r).", bounds(0, low_open=True))
    dropout: float = _f(0.0, "LoRA dropout.", bounds(0, 1, high_open=True))
    target_modules: list[str] | None = _f(
        None, "Module names that get adapters (default: every attention projection except k_rope_proj)."
    )
    modules_to_save: list[str] | None = _f(
        None, "Modules trained in full next to the adapters (default: k_rope_proj, the small new RoPE key)."
    )
    save_adapter: bool = _f(True, "Also write the unmerged adapter to OUT/lora-adapter/.")


@dataclass
class EvalSection:
    every: int = _f(100, "Evaluate perplexity every N optimiser steps (0 = only before and after training).", bounds(0))
    batch: int = _f(4, "Sequences per evaluation forward pass.", bounds(1))


@dataclass
class RecoverySection:
    against: str | None = _f(
        "source", "Model the distance is measured to, before and after training: 'source' (from the input's "
        "conversion.json), a folder, a .gguf file or a Hub id; null = skip.")
    text: list[str] = _f(
        [], "Held-out text files of another domain than data.train (plain or JSON lines); empty = data.eval's "
        "sequences, which share the training text's domain and so flatter the recovery.")
    tokens: int = _f(4096, "Tokens of recovery.text scored (cheap by default).", bounds(1))
    window: int = _f(1024, "Tokens per scored window (the model's context length for the full measurement).",
                     bounds(2))
    passkey: bool = _f(False, "Also passkey retrieval before and after (and of the source), hidden in "
                       "recovery.text when given; costs many generations.")
    passkey_lengths: list[int] = _f([1024, 2048, 4096, 8192], "Passkey prompt lengths.", bounds(16))
    passkey_trials: int = _f(2, "Passkey keys per length and depth (5 depths).", bounds(1))
    positions: bool = _f(False, "Also the loss per position bucket against the source (needs recovery.text).")


@dataclass
class CheckpointSection:
    dir: str | None = _f(None, "Checkpoint folder (default: OUTPUT.checkpoints beside the output).")
    every: int = _f(
        500, "Save accelerate state every N optimiser steps (and always at the end; 0 = end only).", bounds(0))
    keep: int = _f(2, "Keep this many most recent checkpoints.", bounds(1))


@dataclass
class LogSection:
    every: int = _f(10, "Print loss, lr and tokens/s every N optimiser steps.", bounds(0))
    tensorboard: bool = _f(False, "Also log to tensorboard (needs `pip install tensorboard`).")
    dir: str | None = _f(None, "Tensorboard folder (default: the checkpoint folder's runs/).")


@dataclass
class OutputSection:
    dir: str = _f("", "Output folder: a converted HF folder like `gtakit convert` writes, with updated card.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "Saved dtype; auto = the input model's.")
    max_shard_size: str = _f("5GB", "Largest safetensors shard.")
    force: bool = _f(False, "Overwrite a non-empty output folder.")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalSection = field(default_factory=EvalSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @property
    def checkpoint_dir(self) -> Path:
        if self.checkpoint.dir:
            return Path(self.checkpoint.dir).expanduser()
        out = Path(self.output.dir).expanduser()
        return out.with_name(out.name + ".checkpoints")


# ------------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, str -> [str])."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except GtakitError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        # YAML reads `no` as False; precision: no is meant as the string
        if value is False and "no" in typing.get_args(tp):
            return "no"
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single file is a list of one
        if isinstance(value, list):
            return [_coerce(v, item, key) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:  # PyYAML reads 1e6 (no dot) as a string; it is a natural way to write a budget
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise GtakitError(f"recipe key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GtakitError(f"recipe key '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise GtakitError(f"recipe: unknown key '{prefix}{key}' (known here: {known})")
    values = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**values)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise GtakitError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings -> (key, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise GtakitError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def load_recipe(source: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe (a YAML file, or an already-parsed mapping), applying `key=value` overrides.

    A recipe file's relative input paths are read from the working directory, or where nothing is there, from
    the recipe file's folder (`_from_recipe_folder`); overrides and output paths are relative to the working
    directory, as on the command line."""
    folder = None
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise GtakitError(f"recipe {path} does not exist (see `gtakit recipes list`)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise GtakitError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        folder = path.parent
    if not isinstance(raw, dict):
        raise GtakitError("a recipe must be a YAML mapping of sections (model, data, train, ...)")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy so overrides never touch the caller's mapping
    if folder is not None:
        _from_recipe_folder(raw, folder)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


# Inputs a recipe file may name relative to itself. Outputs stay relative to the working directory: they
# usually exist nowhere yet, so there is nothing to tell the two apart by.
RECIPE_INPUTS = (("model", "path"), ("teacher", "model"), ("data", "train"), ("data", "eval"))


def _from_recipe_folder(raw: dict, folder: Path) -> None:
    """Rewrite (in place) relative input paths that match nothing from the working directory but something
    beside the recipe file, so a recipe kept next to its data runs from any directory."""
    for section, key in RECIPE_INPUTS:
        values = raw.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values[key]
        if section == "teacher" and value == "source":  # a keyword, not a path
            continue
        values[key] = [_beside(v, folder) for v in value] if isinstance(value, list) else _beside(value, folder)


def _beside(value: Any, folder: Path) -> Any:
    if not isinstance(value, str) or not value or value.startswith("hf:") or Path(value).expanduser().is_absolute():
        return value
    if glob.glob(value):  # globs allowed in data.train: a match here wins, as before
        return value
    there = str(folder / value)
    return there if glob.glob(there) else value


def validate(recipe: Recipe) -> None:
    """Cross-field checks that need no files."""
    if not recipe.model.path:
        raise GtakitError("recipe key 'model.path' is required: the converted model folder")
    if not recipe.output.dir:
        raise GtakitError("recipe key 'output.dir' is required: where the uptrained model is written")
    if not recipe.data.train and not recipe.data.teacher_samples:
        raise GtakitError("recipe key 'data.train' is required: training text files or hf:NAME (or "
                          "data.teacher_samples: tokens the teacher writes)")
    for section in dataclasses.fields(recipe):  # every number within the range its field declares
        check_ranges(getattr(recipe, section.name), lambda name, s=section.name: f"recipe key '{s}.{name}'",
                     GtakitError)
    t = recipe.train
    if len(t.betas) != 2:
        raise GtakitError(f"recipe key 'train.betas' needs two numbers, got {t.betas}")
    loss = recipe.loss
    if loss.kind in ("distill", "mix") and not recipe.teacher.model:
        raise GtakitError(f"loss.kind {loss.kind} needs a teacher: set teacher.model (e.g. 'source')")
    if recipe.data.teacher_samples and not recipe.teacher.model:
        raise GtakitError("data.teacher_samples are written by the teacher: set teacher.model (e.g. 'source')")
    if loss.attention_weight and loss.kind == "ce":
        raise GtakitError("loss.attention_weight matches the teacher's attention outputs: use loss.kind distill or mix")


def describe_schema(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field: for docs and `--help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_schema(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
