"""The settings of one conversion: one dataclass whose help texts also make the `gtakit convert` options."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError, asdict, dataclass, field, fields, replace
from typing import Any

from gtakit.errors import GtakitError
from gtakit.forms import DEFAULT_FORM, FORMS
from gtakit.models import SOURCE_FORM
from gtakit.ranges import Range, bounds, check_ranges


def option(default: Any, help: str, cli_type: type | None = None, flag: str | None = None,  # noqa: A002
           range: Range | None = None) -> Any:  # noqa: A002
    """A dataclass field with its `gtakit convert` help (and the CLI type and flag when they differ, and the valid
    range of a number: `check_options` refuses anything outside it)."""
    metadata = {"help": help, "cli_type": cli_type, "flag": flag, "range": range}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ConvertOptions:
    """Settings of one conversion; `gtakit convert --help` is generated from these fields."""

    target: str = option(DEFAULT_FORM, f"Target form: {', '.join(FORMS)}.", flag="--to")
    groups: int | None = option(None, "GTA: number of tied-state groups (default: source KV heads).", range=bounds(1))
    latent_heads: int | None = option(
        None, "GLA: latent heads (default 2 if it divides the query and KV heads, else the KV heads).", range=bounds(1))
    kv_rank: int | str | None = option(
        None, "GLA/MLA: latent width per latent head (1 to the model's full rank), or 'full' (lossless). Default: the "
        "papers' budget.", str)
    rope_dim: int | str | None = option(
        None, "Width of the shared RoPE key, or 'full' (every RoPE component; GLA/MLA lossless). Default: GTA d/2; "
        "GLA/MLA about a third of the cache, 24 to min(64, d).", str, range=bounds(0))
    maps: int | None = option(None, "GHLA: attention maps per layer; must divide the query heads (default: one per query head).",
        range=bounds(1))
    key_heads: int | None = option(None, "GHLA: fully rotary key heads (default 1).", range=bounds(1))
    latent_dim: int | str | None = option(
        None, "GHLA: latent value width, or 'full' (lossless). Default: half the source cache minus keys.", str)
    ghla_query: str = option(
        "auto", "GHLA map query: auto (better of mean and central, measured on --calib), mean (least squares), "
        "central head, or fit (members' queries combined to fit their attention maps; needs --calib; slow).")
    rope_grid: str = option(
        "auto", "GLA/MLA: RoPE frequencies the shared key may use: none (any, chosen per layer), spread (every "
        "(d/r)-th from the fastest; one global table, as DeepSeek-V3 needs), fastest (the r/2 fastest; one global "
        "table; measured better). auto: none, or fastest for --format deepseek-v3.")
    rope_rotation_credit: float = option(
        0.5, "GTA/GLA/MLA with --calib: which RoPE components the shared key keeps. Each is ranked by its score "
        "energy less this share of what its measured mean rotation could stand in for once dropped: 0 ranks by "
        "energy alone, 1 trusts the mean rotation fully (the default before 0.3: short-window perplexity 0.4% better "
        "on SmolLM2 MLA 50%, but passkey retrieval lost from 2k tokens on, as the rotation is measured over "
        "calibration attention, which is mostly short-range).", range=bounds(0, 1))
    gta_state: str = option("joint", "GTA tied state: joint (key/value subspace) or value (exact values).")
    key_norm: str = option(
        "cached", "QK-norm sources (Qwen3, Gemma 3, OLMo-2): cached (each token's key norm scalar cached beside the "
        "latent, exact; KV heads extra elements per token and layer) or mean (its calibrated mean folded into the "
        "weights; no extra cache, approximate; needs --calib).")
    layers: list[str] = option(
        [], "Per-layer settings, repeatable: RANGE:source keeps those layers' own attention; RANGE:key=value,... "
        "overrides options there (to, kv_rank, rope_dim, latent_heads, groups, ...). RANGE: 3, 0-5 or 12-.",
        flag="--layer")
    init: str = option("auto", "Initialisation: auto (aware with --calib, else svd), svd, pca or aware.")
    calib: str | None = option(None, "Calibration text (plain text or JSON lines with 'text').")
    calib_tokens: int = option(
        65536, "Calibration tokens (quality flattens from here on SmolLM2: benchmarks/RESULTS.md, calibration size).",
        range=bounds(1024))
    calib_seq_len: int = option(2048, "Calibration sequence length.", range=bounds(16))
    calib_device: str = option("auto", "Device for calibration: auto (cuda if available), cpu, cuda.")
    refit: str = option(
        "auto", "Refit after the closed-form conversion, on --calib: output (o_proj refitted by least squares so "
        "each converted attention's output matches the source's on the calibration inputs) or none. auto: output "
        "with --calib, none without.")
    refit_tokens: int = option(
        0, "Calibration tokens the output refit fits on, per layer: exactly the first N (whatever the device's "
        "batch); 0: all of them. Fewer make the conversion quicker (the refit's pass is about a third of it).",
        range=bounds(0))
    refit_ridge: float | str = option(
        "auto", "Ridge of the output refit, relative to the mean eigenvalue of its input moment: how strongly the "
        "refitted o_proj is pulled towards the closed-form one (larger: less fitted to the calibration text); "
        "auto: per layer, the one of 1e-4, 1e-3, 1e-2, 0.1, 1 with the least error on held-out calibration sequences "
        "(every 4th), recorded per layer as refit_ridge.", str, range=bounds(0, low_open=True))
    refine_steps: int = option(
        0, "Layer-local fitting: Adam steps per converted layer on its source attention's inputs and outputs "
        "(--refine-tokens of --calib), before the refit; 0: none.", range=bounds(0))
    refine_tokens: int = option(16384, "Calibration tokens the layer-local fitting uses per layer.", range=bounds(1))
    sequential: bool = option(
        False, "Calibrate each layer on the hidden states of the layers already converted (error feedback, as in "
        "GPTQ) instead of the source's; needs --calib.")
    allocate: str = option(
        "none", "Per-layer budget allocation: error (measure each layer's output error at several widths, and in "
        "source form, on --allocate-tokens of --calib, then spend the same total KV cache where it lowers the summed "
        "error most; layers named by --layer keep their settings) or none (every layer at the same widths).")
    allocate_tokens: int = option(8192, "Calibration tokens on which --allocate error measures the layers.",
        range=bounds(1024))
    output_format: str = option(
        "gtakit", "Output format: gtakit (a folder loaded with gtakit or trust_remote_code) or deepseek-v3 (--to mla "
        "as a native DeepSeek-V3 checkpoint for transformers, vLLM and llama.cpp; needs --calib).", flag="--format")
    latent_norm: str = option(
        "refit", "deepseek-v3: how the format's RMSNorm on the latent is met: refit (the latent up-projection "
        "refitted by least squares on normalised latents, no biases: every engine) or anchor (exact with a constant "
        "bias coordinate; transformers only, as vLLM and llama.cpp drop biases).")
    norm_tokens: int = option(16384, "deepseek-v3: calibration tokens for the latent norm's fit.", range=bounds(1024))
    dtype: str = option("auto", "Output dtype: auto (the source's), float32, bfloat16 or float16.")
    max_shard_size: str = option("5GB", "Largest safetensors shard.")
    eval_text: str | None = option(None, "Measure source and converted perplexity on this text.")
    eval_tokens: int = option(65536, "Tokens of --eval-text to use.", range=bounds(1))
    eval_window: int = option(1024, "Tokens per perplexity window for --eval-text.", range=bounds(2))

    def to_dict(self) -> dict:
        return asdict(self)

    def frozen(self) -> "ConvertOptions":
        """A copy that refuses assignment: what `resolve_options` hands to every step (`dataclasses.replace` still
        makes changed copies)."""
        copy = replace(self)
        object.__setattr__(copy, "_frozen", True)
        return copy

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise FrozenInstanceError(f"resolved options are frozen: use dataclasses.replace to change {name}")
        super().__setattr__(name, value)


def check_options(options: ConvertOptions, calibrated: bool | None = None) -> None:
    """Everything about the options that needs no model, before any work: every numeric option within the range
    its field declares, the --layer syntax, and choices that would otherwise be ignored or fall back silently.
    `calibrated`: whether calibration data will be there (default: --calib is given)."""
    from gtakit.forms.qk_norm import KEY_SCALE_MODES  # noqa: PLC0415

    from .refine import resolve_ridge  # noqa: PLC0415

    check_ranges(options, flag_of, GtakitError)
    resolve_ridge(options.refit_ridge)
    calibrated = bool(options.calib) if calibrated is None else calibrated
    layers = parse_layer_overrides(options.layers, None)
    every = [options, *(replace(options, **settings) for settings in layers.values())]
    for effective in every:
        if effective.key_norm not in KEY_SCALE_MODES:
            raise GtakitError(f"--key-norm must be one of {', '.join(KEY_SCALE_MODES)}, got {effective.key_norm!r}")
    if not calibrated:
        if any(effective.key_norm == "mean" for effective in every):
            raise GtakitError("--key-norm mean folds the calibrated mean key norm into the weights: pass --calib FILE")
        if any(effective.ghla_query == "fit" for effective in every):
            raise GtakitError("--ghla-query fit fits the map queries on calibration text: pass --calib FILE")
    defaults = ConvertOptions()
    if options.refit == "none" or (options.refit == "auto" and not calibrated):
        ignored = [flag_of(name) for name in ("refit_ridge", "refit_tokens")
                   if getattr(options, name) != getattr(defaults, name)]
        if ignored:
            raise GtakitError(f"{' and '.join(ignored)} {'set' if len(ignored) > 1 else 'sets'} the output refit, which "
                              f"{'--refit none turns off' if options.refit == 'none' else 'needs --calib FILE'}; "
                              "drop them or refit")


# Options a --layer override may set (what shapes one layer), by field name.
PER_LAYER = ("target", "groups", "latent_heads", "kv_rank", "rope_dim", "maps", "key_heads", "latent_dim",
             "ghla_query", "gta_state", "key_norm")
RANGE = re.compile(r"^(\d+)(?:-(\d*))?$")
FIELD_RANGES = {f.name: f.metadata["range"] for f in fields(ConvertOptions) if f.metadata.get("range")}


def flag_of(name: str) -> str:
    meta = {f.name: f.metadata for f in fields(ConvertOptions)}[name]
    return meta.get("flag") or "--" + name.replace("_", "-")


def parse_layer_overrides(specs: list[str], num_layers: int | None) -> dict[int, dict[str, Any]]:
    """`--layer` values -> {layer: {field: value}} (`{"target": "source"}` keeps a layer as it is). A layer's
    setting is given once: overlapping ranges that set the same key, or a key repeated, are refused. Without
    `num_layers` (before the model is read) only the syntax and values are checked."""
    overrides: dict[int, dict[str, Any]] = {}
    given: dict[tuple[int, str], str] = {}
    for text in specs:
        where, sep, what = text.partition(":")
        match = RANGE.match(where.strip())
        if not sep or not match or not what.strip():
            raise GtakitError(f"--layer {text!r}: use RANGE:source or RANGE:key=value,... (RANGE: 3, 0-5 or 12-)")
        first = int(match.group(1))
        open_end = match.group(2) == ""
        last = (num_layers - 1 if num_layers is not None else first) if open_end else int(match.group(2) or first)
        if last < first:
            raise GtakitError(f"--layer {text!r}: the range {first}-{last} is reversed; write {last}-{first}")
        if num_layers is not None and last >= num_layers:
            raise GtakitError(f"--layer {text!r}: layers {first}-{last} are outside 0-{num_layers - 1}")
        settings = _layer_settings(text, what.strip())
        for layer in range(first, last + 1):
            for key in settings:
                earlier = given.setdefault((layer, key), text)
                if earlier != text:
                    raise GtakitError(f"--layer {text!r} and --layer {earlier!r} both set "
                                      f"{'the form' if key == 'target' else key} of layer {layer}; set it once")
            overrides.setdefault(layer, {}).update(settings)
    return overrides


# --layer keys whose value is a whole number, or a whole number or 'full'
_COUNTS = ("groups", "latent_heads", "maps", "key_heads")
_WIDTHS = ("kv_rank", "rope_dim", "latent_dim")


def _layer_settings(text: str, what: str) -> dict[str, Any]:
    if what == SOURCE_FORM:
        return {"target": SOURCE_FORM}
    settings: dict[str, Any] = {}
    for item in what.split(","):
        key, eq, value = item.partition("=")
        key = {"to": "target"}.get(key.strip().replace("-", "_"), key.strip().replace("-", "_"))
        if not eq or key not in PER_LAYER:
            raise GtakitError(f"--layer {text!r}: {item.strip()!r} is not KEY=VALUE with KEY one of to, "
                              f"{', '.join(k for k in PER_LAYER if k != 'target')}")
        if key in settings:
            raise GtakitError(f"--layer {text!r}: {key} is given twice; give it once")
        settings[key] = _layer_value(text, key, value.strip())
    return settings


def _layer_value(text: str, key: str, value: str) -> Any:
    """A --layer value as its option takes it, within the option's declared range."""
    if key not in _COUNTS + _WIDTHS:
        return value
    if key in _WIDTHS and value == "full":
        return value
    if not value.lstrip("-").isdigit():
        what = "a whole number" + (" or 'full'" if key in _WIDTHS else "")
        raise GtakitError(f"--layer {text!r}: {key} must be {what}, got {value!r}")
    number = int(value)
    valid = FIELD_RANGES.get(key)
    if valid is not None and not valid.allows(number):
        raise GtakitError(f"--layer {text!r}: {key} must be {valid.describe()}, got {number}")
    return number


def layer_options(options: ConvertOptions, override: dict[str, Any]) -> ConvertOptions:
    return replace(options, **override) if override else options
