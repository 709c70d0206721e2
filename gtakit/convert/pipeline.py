"""`gtakit convert`: plan, then stream a source checkpoint layer by layer through the form converters into a sink
(the gtakit folder, or memory)."""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

import gtakit
from gtakit.errors import GtakitError
from gtakit.families import FamilyAdapter, FamilyChecks, check_positions, family_of
from gtakit.formats import FolderSink, MemorySink, Sink, check_shard_size, deepseek_v3
from gtakit.formats.deepseek_v3 import DeepSeekV3Sink
from gtakit.io import DTYPES
from gtakit.io.output import OutputFolder
from gtakit.io.source import SourceModel, check_tokenizer, open_source
from gtakit.io.text import check_text_file, read_text
from gtakit.models import SOURCE_FORM

from .allocate import allocate_budget, check_allocation
from .calibration import CalibrationLayer, LayerwiseCalibrator, check_calib_device, is_local_text
from .layer import convert_attention
from .methods import get_init_method, resolve_init
from .export import check_export_options, export_model, norm_ids, write_report
from .options import ConvertOptions, check_options
from .plan import ConversionPlan, plan_conversion
from .refine import LayerRefiner, resolve_refit, resolve_ridge


# From this --eval-window on, conversion also records loss by position and passkey retrieval. Below it there is
# little distance to lose information over, and the passkey trials cost more than the perplexity itself.
LONG_EVAL_WINDOW = 2048


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def open_convertible(src: str | Path | None) -> SourceModel:
    """Open SRC and refuse, in one line, what no family adapter converts faithfully."""
    return open_source(src, FamilyChecks())


def iter_converted_tensors(
    source: SourceModel,
    plan: ConversionPlan,
    method,
    stats_for_layer: Callable[[int], object] | None,
    layer_reports: list[dict],
    progress: bool = False,
    refiner: LayerRefiner | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the target checkpoint tensor by tensor, one source layer in memory at a time. The RoPE frequencies a
    layer keeps are written into its spec in `plan` as it is converted."""
    family, weights = plan.family, source.weights
    kept = frozenset(index for index, layer in enumerate(plan.layers) if layer.form is None)
    by_layer: dict[int | None, list[str]] = {}
    for name, layer in family.passthrough(weights, source.config, kept):
        by_layer.setdefault(layer, []).append(name)
    for name in by_layer.get(None, []):
        yield name, family.read(weights, source.config, name)
    for index, layer in enumerate(tqdm(plan.layers, desc="converting layers", disable=not progress)):
        # Every layer in order: a live calibration moves on one layer at a time.
        live = stats_for_layer.layer(index) if isinstance(stats_for_layer, LayerwiseCalibrator) else None
        stats = live.stats if live is not None else stats_for_layer(index) if stats_for_layer is not None else None
        if layer.form is None:
            layer_reports.append({"layer": index, "form": SOURCE_FORM})
        else:
            yield from _convert_layer(family, source, index, layer, method, stats, layer_reports,
                                      refiner if live is not None else None, live)
        for name in by_layer.get(index, []):
            yield name, family.read(weights, source.config, name)


def _convert_layer(family: FamilyAdapter, source: SourceModel, index: int, layer, method, stats,
                   layer_reports: list[dict], refiner: LayerRefiner | None = None,
                   live: CalibrationLayer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    converted = convert_attention(family, source, index, layer, method, stats)
    layer.spec.update(converted.spec_updates)
    if refiner is not None:
        converted = refiner(live, layer.spec, converted)
    prefix = family.attention_prefix(index)
    for name, tensor in converted.tensors.items():
        yield prefix + name, tensor
    layer_reports.append({"layer": index, "form": layer.name,
                          **{k: round(v, 6) for k, v in converted.metrics.items()}})


def stream(source: SourceModel, plan: ConversionPlan, sink: Sink, dtype: torch.dtype, method, stats_for_layer,
           progress: bool, refiner: LayerRefiner | None = None) -> list[dict]:
    """Convert every layer into `sink`; returns the per-layer report."""
    sink.start(plan.config(), dtype)
    layer_reports: list[dict] = []
    for name, tensor in iter_converted_tensors(source, plan, method, stats_for_layer, layer_reports, progress,
                                               refiner):
        sink.add(name, tensor)
    if isinstance(stats_for_layer, LayerwiseCalibrator):  # its hidden states are no longer needed
        stats_for_layer.finish()
    return layer_reports


def layer_refiner(source: SourceModel, options: ConvertOptions, stats_for_layer) -> LayerRefiner | None:
    """The refinement the (resolved) options ask for, or None. Refinement runs the converted layers on calibration
    inputs, so it needs the live calibrator (not precomputed statistics)."""
    live = isinstance(stats_for_layer, LayerwiseCalibrator)
    if (options.sequential or options.refine_steps) and not live:
        what = "--sequential calibrates every layer on the converted layers before it" if options.sequential else \
            "--refine-steps fits each converted layer on calibration text"
        raise GtakitError(f"{what}: pass --calib FILE")
    refiner = LayerRefiner(source.config, options.refit, options.sequential, options.refine_steps,
                           options.refine_tokens, options.refit_tokens, resolve_ridge(options.refit_ridge))
    return refiner if refiner.active else None


def _allocate(source: SourceModel, plan: ConversionPlan, options: ConvertOptions, method, sink_class,
              progress: bool) -> ConversionPlan:
    """`--allocate`: the plan with the total cache spent unevenly across layers (what was measured in its
    `allocation`)."""
    if options.allocate == "none":
        return plan
    # A layer kept in source form honours no output-format constraint.
    settings, allocation = allocate_budget(source, plan, options, method, not sink_class.constraints, progress)
    allocated = replace(options, layers=[*options.layers, *settings])
    plan = plan_conversion(source, plan.family, allocated, sink_class.constraints, sink_class.name, sink_class.hint)
    plan.allocation = allocation
    return plan


def resolve_options(options: ConvertOptions, has_statistics: bool = False, live: bool | None = None
                    ) -> ConvertOptions:
    """The options every later step reads: checked once, each `auto` resolved, as a frozen copy (the caller's
    object is left as it was). `has_statistics`: calibration statistics are given instead of --calib text;
    `live`: the statistics come from a live calibrator (default: exactly when --calib text is calibrated on)."""
    calibrated = bool(options.calib) or has_statistics
    check_options(options, calibrated)
    check_allocation(options, bool(options.calib))
    if options.refine_steps < 0 or options.refine_tokens < 1 or options.refit_tokens < 0:
        raise GtakitError("--refine-steps and --refit-tokens must be >= 0 and --refine-tokens >= 1")
    init = resolve_init(options.init, calibrated)
    if get_init_method(init).needs_calibration and not calibrated:
        raise GtakitError(f"--init {init} needs calibration text: pass --calib FILE")
    live = (get_init_method(init).needs_calibration and not has_statistics) if live is None else live
    return replace(options, init=init, refit=resolve_refit(options.refit, live)).frozen()


def with_calib_seq_len(options: ConvertOptions, source: SourceModel, family: FamilyAdapter,
                       log: Callable[[str], None]) -> ConvertOptions:
    """The resolved options with --calib-seq-len within the model's positions (see `_calib_seq_len`), where
    anything calibrates (an init that needs it, or an export's latent-norm fit)."""
    if not (get_init_method(options.init).needs_calibration or options.output_format != FolderSink.name):
        return options
    return replace(options, calib_seq_len=_calib_seq_len(source, family, options, log)).frozen()


def _calibrator(source: SourceModel, family: FamilyAdapter, options: ConvertOptions, progress: bool):
    from .calibration import collect_layer_statistics  # noqa: PLC0415 - only when calibrating

    return collect_layer_statistics(source, options, progress=progress, family=family)


def convert_in_memory(
    source: SourceModel, options: ConvertOptions, progress: bool = False, stats_for_layer=None
) -> tuple[torch.nn.Module, dict]:
    """Convert without writing anything (benchmarks, experiments): returns (model in float32, per-layer report)."""
    has_statistics = stats_for_layer is not None
    options = resolve_options(options, has_statistics,
                              live=isinstance(stats_for_layer, LayerwiseCalibrator) if has_statistics else None)
    family = family_of(source.config)
    family.check_config(source.config)
    plan = plan_conversion(source, family, options, MemorySink.constraints, MemorySink.name)
    method = get_init_method(options.init)
    plan = _allocate(source, plan, options, method, MemorySink, progress)
    if method.needs_calibration and stats_for_layer is None:
        stats_for_layer = _calibrator(source, family, options, progress)
    sink = MemorySink()
    refiner = layer_refiner(source, options, stats_for_layer)
    layer_reports = stream(source, plan, sink, torch.float32, method, stats_for_layer, progress, refiner)
    return sink.finish(plan.config(), {}), {"layers": layer_reports, "plan": plan, "allocation": plan.allocation,
                                            "options": options}


def check_before_reading(options: ConvertOptions) -> None:
    """Every check of the options and named files that needs no model: before the output folder is looked at."""
    check_options(options)
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise GtakitError(f"--dtype must be auto, {', '.join(DTYPES)}; got {options.dtype!r}")
    check_shard_size(options.max_shard_size)
    check_calib_device(options.calib_device)
    if options.calib is not None and is_local_text(options.calib):
        check_text_file(options.calib, "--calib")
    check_export_options(options)


def convert(
    src: str | Path | None,
    out: str | Path,
    options: ConvertOptions | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Convert SRC into OUT; returns the report also written to OUT/conversion.json."""
    started = time.time()
    options = options or ConvertOptions()
    log = log or (lambda message: None)
    out = Path(out).expanduser()
    check_before_reading(options)
    output = OutputFolder(out, force, protect=_inputs(src, options), log=log)
    output.check()
    eval_text = _read_eval_text(options)  # before minutes of calibration, not after
    source = open_convertible(src)
    family = family_of(source.config)
    if eval_text is not None and options.eval_window >= LONG_EVAL_WINDOW:
        from gtakit.evaluate.positions import check_window  # noqa: PLC0415 - only with a long evaluation

        check_window(source.config, options.eval_window, "--eval-window")
    options = resolve_options(options)
    output_format = OUTPUT_FORMATS[options.output_format]
    method = get_init_method(options.init)
    if method.needs_calibration or eval_text is not None or output_format.needs_tokenizer:
        check_tokenizer(source)
    sink_class = output_format.sink
    plan = plan_conversion(source, family, options, sink_class.constraints, sink_class.name, sink_class.hint)
    options = with_calib_seq_len(options, source, family, log)  # after every refusal: it may log a warning
    plan = _allocate(source, plan, options, method, sink_class, progress)
    output_format.check_plan(plan)
    dtype = DTYPES[options.dtype] if options.dtype != "auto" else source.weights.get(family.embedding_name).dtype
    before, after = plan.source_elements_per_token, plan.target_elements_per_token
    if options.init == "svd":
        log("no --calib text: weight-only SVD initialisation; pass --calib FILE for far better quality")
    log(f"KV cache per token: {before} -> {after} elements ({after / before:.1%}), {_summary(plan)}")

    stats_for_layer = _calibrator(source, family, options, progress) if method.needs_calibration else None
    refiner = layer_refiner(source, options, stats_for_layer)
    with output.staging() as tmp:
        sink = output_format.open(tmp, options)
        layer_reports = stream(source, plan, sink, torch.float32 if sink.in_memory else dtype, method,
                               stats_for_layer, progress, refiner)
        report = _report(source, plan, options, dtype, layer_reports)
        written = output_format.write(sink, plan, source, tmp, options, dtype, report, log)
        if eval_text is not None:
            report["evaluation"] = evaluate_output(source, written, eval_text, options, progress)
        report["wall_time_s"] = round(time.time() - started, 2)
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        output_format.write_report(tmp, report)
    log(f"wrote {out} in {report['wall_time_s']:.1f}s (peak RSS {report['peak_rss_mb']:.0f} MB)")
    return report


@dataclass
class Written:
    """What an output format wrote, for the evaluation: how to load it (`load`), and models measured beside it
    (`also`: name -> model already in memory)."""

    load: Callable[[], torch.nn.Module]
    also: dict[str, torch.nn.Module] = field(default_factory=dict)


def _write_folder(sink: FolderSink, plan: ConversionPlan, source: SourceModel, folder: Path,
                  options: ConvertOptions, dtype: torch.dtype, report: dict, log: Callable[[str], None]) -> Written:
    """The gtakit folder: weights, config, model files, tokenizer and generation config."""
    from gtakit.evaluate import load_model  # noqa: PLC0415 - evaluation only

    tokenizer = source.load_tokenizer() if source.gguf_file is not None else None
    sink.finish(plan.config(), None, tokenizer=tokenizer, generation_config=source.generation_config())
    if tokenizer is None:
        _copy_tokenizer_files(source, folder, log)
    return Written(lambda: load_model(str(folder))[0])


def _write_deepseek_v3(sink: DeepSeekV3Sink, plan: ConversionPlan, source: SourceModel, folder: Path,
                       options: ConvertOptions, dtype: torch.dtype, report: dict,
                       log: Callable[[str], None]) -> Written:
    """--format deepseek-v3: the converted MLA (in memory) written and checked as a DeepSeek-V3 folder."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = sink.finish(plan.config(), {})
    tokenizer = source.load_tokenizer()
    report["export"] = export_model(model, folder, norm_ids(tokenizer, options), options, dtype, log)
    tokenizer.save_pretrained(folder)
    generation_config = source.generation_config()
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    return Written(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                   also={"gtakit_mla_perplexity": model})


@dataclass(frozen=True)
class OutputFormat:
    """One `--format`: its sink, how the streamed conversion is completed into the folder, and what it needs."""

    sink: type[Sink]
    open: Callable[[Path, ConvertOptions], Sink]
    write: Callable[..., Written]
    write_report: Callable[[Path, dict], None]
    needs_tokenizer: bool = False
    check_plan: Callable[[ConversionPlan], None] = lambda plan: None


OUTPUT_FORMATS = {
    FolderSink.name: OutputFormat(FolderSink, lambda folder, options: FolderSink(folder, options.max_shard_size),
                                  _write_folder, lambda folder, report: FolderSink(folder).write_report(report)),
    DeepSeekV3Sink.name: OutputFormat(DeepSeekV3Sink, lambda folder, options: DeepSeekV3Sink(), _write_deepseek_v3,
                                      write_report, needs_tokenizer=True,
                                      check_plan=lambda plan: deepseek_v3.check_layers(plan.config())),
}


def _copy_tokenizer_files(source: SourceModel, folder: Path, log: Callable[[str], None]) -> None:
    files = list(source.tokenizer_files())
    for path in files:
        shutil.copyfile(path, folder / path.name)
    if not files:
        log(f"warning: {source.name} has no tokenizer files; the output folder has none either")


def _report(source: SourceModel, plan: ConversionPlan, options: ConvertOptions, dtype: torch.dtype,
            layer_reports: list[dict]) -> dict:
    element_size = torch.empty(0, dtype=dtype).element_size()
    before, after = plan.source_elements_per_token, plan.target_elements_per_token
    shape = plan.shape
    return {
        "gtakit_version": gtakit.__version__,
        "source": {
            "name": source.name,
            "kind": source.kind,
            **({"path": str((source.folder / source.gguf_file).resolve())} if source.gguf_file else {}),
            "model_type": source.config.model_type,
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
        },
        "target": options.target,
        "target_title": plan.layers_title(),
        "settings": options.to_dict(),
        "architecture": _architecture(plan),
        "kv_cache": {
            "dtype": str(dtype).removeprefix("torch."),
            "elements_per_token_before": before,
            "elements_per_token_after": after,
            "bytes_per_token_before": before * element_size,
            "bytes_per_token_after": after * element_size,
            "elements_per_token_per_layer_before": shape.cache_elements,
            "elements_per_token_per_layer": plan.layer_elements,
            "ratio": after / before,
        },
        "layers": layer_reports,
        **({"allocation": plan.allocation} if plan.allocation is not None else {}),
    }


def _summary(plan: ConversionPlan) -> str:
    """One log line: the form and widths, per run of equal layers."""
    runs: list[tuple[str, int, int]] = []
    for index, layer in enumerate(plan.layers):
        text = layer.name if layer.form is None else f"{layer.name} ({layer.form.summary(layer.spec)})"
        if runs and runs[-1][0] == text:
            runs[-1] = (text, runs[-1][1], index)
        else:
            runs.append((text, index, index))
    if len(runs) == 1:
        return runs[0][0]
    return "; ".join(f"layers {a}-{b}: {text}" if a != b else f"layer {a}: {text}" for text, a, b in runs)


def _architecture(plan: ConversionPlan) -> dict:
    """Report fields: the widths of the converted layers (one value when all agree, else one per layer)."""
    arch: dict = {"model_type": "gtakit", "source_model_type": plan.source_config.model_type,
                  "forms": [layer.name for layer in plan.layers] if len(plan.targets) > 1 else plan.targets[0]}
    converted = [layer for layer in plan.layers if layer.form is not None]
    names = dict.fromkeys(name for layer in converted for name in layer.form.report_fields)
    for name in names:
        values = [layer.spec.get(name) for layer in plan.layers]
        present = [v for layer, v in zip(plan.layers, values) if layer.form is not None and name in layer.spec]
        arch[name] = present[0] if len(set(map(str, present))) == 1 and len(present) == len(plan.layers) else values
    return arch


def _inputs(src: str | Path | None, options: ConvertOptions) -> list[tuple[Path, str]]:
    """Local files the conversion reads: OUT must never hold one of them (--force would delete it)."""
    named = [(src, "the source model"), (options.calib, "the --calib text"), (options.eval_text, "the --eval-text")]
    return [(Path(p).expanduser(), what) for p, what in named if p is not None and Path(p).expanduser().exists()]


def _calib_seq_len(source: SourceModel, family: FamilyAdapter, options: ConvertOptions,
                   log: Callable[[str], None]) -> int:
    """--calib-seq-len within the model's positions: a model with learned positions (GPT-2: 1024) calibrates on
    sequences of its length when the option was left at its default, and refuses a longer one that was given."""
    limit = getattr(source.config, "max_position_embeddings", None)
    if family.learned_positions and limit and options.calib_seq_len > limit \
            and options.calib_seq_len == ConvertOptions.calib_seq_len:
        log(f"calibrating on sequences of {limit} tokens, the model's positions (--calib-seq-len default "
            f"{options.calib_seq_len})")
        return limit
    return check_positions(source.config, options.calib_seq_len, "--calib-seq-len", log)


def _read_eval_text(options: ConvertOptions) -> str | None:
    if options.eval_text is None:
        return None
    if options.eval_window < 2:
        raise GtakitError(f"--eval-window must be at least 2 tokens, got {options.eval_window}")
    if options.eval_tokens < options.eval_window:
        raise GtakitError(f"--eval-tokens {options.eval_tokens} is less than one --eval-window of "
                          f"{options.eval_window}; raise --eval-tokens or lower --eval-window")
    return read_text(options.eval_text, option="--eval-text")


def evaluate_output(source: SourceModel, written: Written, text: str, options: ConvertOptions,
                    progress: bool) -> dict:
    """Perplexity of the written model (loaded as a user would) and of the source on --eval-text, one model in
    memory at a time, plus the perplexity of each model in `written.also`; with a long --eval-window also the
    long-context records of both (see `_eval_scores`)."""
    from gtakit.evaluate import perplexity  # noqa: PLC0415 - evaluation only

    tokenizer = source.load_tokenizer()
    also = {name: perplexity(model, tokenizer, text, options.eval_tokens, window=options.eval_window,
                             progress=progress)["perplexity"] for name, model in written.also.items()}
    converted = written.load()
    result = _eval_scores(converted, tokenizer, text, options, progress)
    del converted
    source_result = _eval_scores(source.load_model(torch.float32), tokenizer, text, options, progress)
    return {"text": str(options.eval_text), "tokens": result["tokens"], "window": result["window"],
            "perplexity": result["perplexity"], **also, "source_perplexity": source_result["perplexity"],
            **_long_context(result, source_result)}


def _passkey_lengths(window: int) -> tuple[int, ...]:
    """Powers of two from 1024 up to `window`: 1024, 2048, 4096, ..."""
    return tuple(1024 << i for i in range(window.bit_length()) if 1024 << i <= window)


def _eval_scores(model, tokenizer, text: str, options: ConvertOptions, progress: bool) -> dict:
    """Perplexity over the --eval-text windows; with a long window also the loss per position bucket (from the same
    forward passes) and passkey retrieval with the eval text as haystack, under `buckets` and `passkey`."""
    from gtakit.evaluate import perplexity
    from gtakit.evaluate.passkey import passkey
    from gtakit.evaluate.positions import position_losses

    window = options.eval_window
    if window < LONG_EVAL_WINDOW:
        return perplexity(model, tokenizer, text, options.eval_tokens, window=window, progress=progress)
    result = position_losses(model, tokenizer, text, window, options.eval_tokens, progress=progress)
    result["passkey"] = passkey(model, tokenizer, _passkey_lengths(window), progress=progress, haystack=text)
    return result


def _long_context(result: dict, source_result: dict) -> dict:
    """The evaluation's long-context records, converted beside source: `positions` (per bucket both perplexities
    and their ratio, and the distance growth) and `passkey` (each model's result); nothing for a short window."""
    from gtakit.evaluate.positions import compare_buckets

    if "buckets" not in result:
        return {}
    return {"positions": compare_buckets(result["buckets"], source_result["buckets"]),
            "passkey": {"source": source_result["passkey"], "converted": result["passkey"]}}
