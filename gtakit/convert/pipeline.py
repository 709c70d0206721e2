"""`gtakit convert`: stream a source checkpoint layer by layer into a GTA / GLA / MLA folder."""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

import gtakit
from gtakit.errors import GtakitError
from gtakit.io.output import OutputFolder
from gtakit.io.text import check_text_file, read_text
from gtakit.models import GHLAForCausalLM, GLAForCausalLM, GTAForCausalLM

from .calibration import check_calib_device, is_local_text
from .card import build_card, dump_json
from .decompose import convert_gla_layer, convert_gta_layer
from .ghla import convert_ghla_layer
from .methods import get_init_method, resolve_init
from .plan import ConvertOptions, TargetPlan, plan_target
from .rope import SourceAttention
from .source import SourceModel, check_tokenizer, open_source, source_head_dim, source_inv_freq
from .writer import StreamingShardWriter, check_shard_size

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHARED_MODEL_FILES = ("configuration_gtakit.py", "common_gtakit.py", "cache_gtakit.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_attention(source: SourceModel, layer: int, inv_freq: torch.Tensor) -> SourceAttention:
    cfg = source.config
    prefix = f"model.layers.{layer}.self_attn."

    def get(name: str, optional: bool = False) -> torch.Tensor | None:
        if optional and not source.weights.has(prefix + name):
            return None
        return source.weights.get(prefix + name).to(torch.float64)

    return SourceAttention(
        wq=get("q_proj.weight"),
        wk=get("k_proj.weight"),
        wv=get("v_proj.weight"),
        wo=get("o_proj.weight"),
        bq=get("q_proj.bias", True),
        bk=get("k_proj.bias", True),
        bv=get("v_proj.bias", True),
        bo=get("o_proj.bias", True),
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=source_head_dim(cfg),
        inv_freq=inv_freq,
    )


MODEL_FILES = {"gta": ("modeling_gta", "GTA"), "gla": ("modeling_gla", "GLA"), "mla": ("modeling_gla", "GLA"),
               "ghla": ("modeling_ghla", "GHLA")}


def model_class(plan: TargetPlan) -> type:
    return {"gta": GTAForCausalLM, "ghla": GHLAForCausalLM}.get(plan.target, GLAForCausalLM)


def meta_state_dict(plan: TargetPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = model_class(plan)(plan.config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and plan.config.tie_word_embeddings:
            continue
        state[name] = tensor if name.endswith("rope_freqs") else tensor.to(dtype)
    return state


def write_config(plan: TargetPlan, folder: Path, dtype: torch.dtype) -> None:
    config = plan.config
    modeling, prefix = MODEL_FILES[plan.target]
    config.architectures = [f"{prefix}ForCausalLM"]
    config.auto_map = {
        "AutoConfig": f"configuration_gtakit.{prefix}Config",
        "AutoModel": f"{modeling}.{prefix}Model",
        "AutoModelForCausalLM": f"{modeling}.{prefix}ForCausalLM",
    }
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    for name in (*SHARED_MODEL_FILES, f"{modeling}.py"):
        shutil.copyfile(MODELS_DIR / name, folder / name)


def copy_tokenizer(source: SourceModel, folder: Path, log: Callable[[str], None]) -> None:
    if source.gguf_file is not None:
        source.load_tokenizer().save_pretrained(folder)
    else:
        files = list(source.tokenizer_files())
        for path in files:
            shutil.copyfile(path, folder / path.name)
        if not files:
            log(f"warning: {source.name} has no tokenizer files; the output folder has none either")
    source.generation_config().save_pretrained(folder)


def iter_converted_tensors(
    source: SourceModel,
    plan: TargetPlan,
    method,
    stats_for_layer: Callable[[int], object] | None,
    layer_reports: list[dict],
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the target checkpoint tensor by tensor, one source layer in memory at a time."""
    inv_freq = source_inv_freq(source.config)
    names = source.weights.keys()
    for name in names:
        if ".layers." in name or "rotary_emb" in name or not name.startswith(("model.", "lm_head")):
            continue
        if name == "lm_head.weight" and plan.config.tie_word_embeddings:
            continue
        yield name, source.weights.get(name)
    for layer in tqdm(range(plan.config.num_hidden_layers), desc="converting layers", disable=not progress):
        attn = read_attention(source, layer, inv_freq)
        stats = stats_for_layer(layer) if stats_for_layer is not None else None
        metric = method.build_metric(attn, stats)
        metric.gta_state = plan.gta_state
        if plan.target == "ghla":
            cfg = plan.config
            sample = getattr(stats, "attention_sample", None)
            converted = convert_ghla_layer(attn, cfg.num_maps, cfg.num_key_heads, cfg.head_dim, cfg.latent_dim, metric,
                                           sample, plan.ghla_query, cfg.softmax_scale)
        elif plan.target == "gta":
            converted = convert_gta_layer(attn, plan.config.num_key_value_heads, plan.config.rope_dim, metric)
        else:
            cfg = plan.config
            rope_pairs = cfg.qk_rope_head_dim // 2
            converted = convert_gla_layer(attn, cfg.num_latent_heads, cfg.kv_lora_rank, rope_pairs, metric)
        for name, tensor in converted.tensors.items():
            yield f"model.layers.{layer}.self_attn.{name}", tensor
        prefix = f"model.layers.{layer}."
        for name in names:
            if name.startswith(prefix) and ".self_attn." not in name:
                yield name, source.weights.get(name)
        layer_reports.append({"layer": layer, **{k: round(v, 6) for k, v in converted.metrics.items()}})


def _init_method(options: ConvertOptions, has_statistics: bool):
    """Resolve `auto` and check that a calibrated method has calibration text (or given statistics)."""
    options.init = resolve_init(options.init, bool(options.calib) or has_statistics)
    method = get_init_method(options.init)
    if method.needs_calibration and not (options.calib or has_statistics):
        raise GtakitError(f"--init {options.init} needs calibration text: pass --calib FILE")
    return method


def _calibrator(source: SourceModel, options: ConvertOptions, progress: bool):
    from .calibration import collect_layer_statistics  # noqa: PLC0415 - only when calibrating

    return collect_layer_statistics(source, options, progress=progress)


def convert_in_memory(
    source: SourceModel, options: ConvertOptions, progress: bool = False, stats_for_layer=None
) -> tuple[torch.nn.Module, dict]:
    """Convert without writing anything (benchmarks, experiments): returns (model in float32, per-layer report)."""
    plan = plan_target(source, options)
    method = _init_method(options, has_statistics=stats_for_layer is not None)
    if method.needs_calibration and stats_for_layer is None:
        stats_for_layer = _calibrator(source, options, progress)
    model = model_class(plan)(plan.config).eval()
    layer_reports: list[dict] = []
    state = dict(iter_converted_tensors(source, plan, method, stats_for_layer, layer_reports, progress))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and plan.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converted state does not match the model: missing {missing}, unexpected {unexpected}")
    if plan.config.tie_word_embeddings:
        model.tie_weights()
    return model, {"layers": layer_reports, "plan": plan}


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
    output = OutputFolder(out, force, protect=_inputs(src, options), log=log)
    output.check()
    method = _init_method(options, has_statistics=False)
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise GtakitError(f"--dtype must be auto, {', '.join(DTYPES)}; got {options.dtype!r}")
    check_shard_size(options.max_shard_size)
    check_calib_device(options.calib_device)
    if options.calib is not None and is_local_text(options.calib):
        check_text_file(options.calib, "--calib")
    eval_text = _read_eval_text(options)  # before minutes of calibration, not after
    source = open_source(src)
    if method.needs_calibration or eval_text is not None:
        check_tokenizer(source)
    plan = plan_target(source, options)
    dtype = DTYPES[options.dtype] if options.dtype != "auto" else source.weights.get("model.embed_tokens.weight").dtype
    num_layers = source.config.num_hidden_layers
    before = plan.source_elements_per_layer * num_layers
    after = plan.target_elements_per_layer * num_layers
    if options.init == "svd":
        log("no --calib text: weight-only SVD initialisation; pass --calib FILE for far better quality")
    log(f"KV cache per token: {before} -> {after} elements ({after / before:.1%}), {plan.target} {_summary(plan)}")

    stats_for_layer = _calibrator(source, options, progress) if method.needs_calibration else None

    with output.staging() as tmp:
        writer = StreamingShardWriter(tmp, meta_state_dict(plan, dtype), options.max_shard_size)
        layer_reports: list[dict] = []
        for name, tensor in iter_converted_tensors(source, plan, method, stats_for_layer, layer_reports, progress):
            writer.add(name, tensor)
        writer.finish()
        write_config(plan, tmp, dtype)
        copy_tokenizer(source, tmp, log)

        element_size = torch.empty(0, dtype=dtype).element_size()
        report = {
            "gtakit_version": gtakit.__version__,
            "source": {
                "name": source.name,
                "kind": source.kind,
                "model_type": source.config.model_type,
                "num_attention_heads": source.config.num_attention_heads,
                "num_key_value_heads": getattr(source.config, "num_key_value_heads", None),
                "head_dim": source_head_dim(source.config),
            },
            "target": plan.target,
            "settings": options.to_dict(),
            "architecture": _architecture(plan),
            "kv_cache": {
                "dtype": str(dtype).removeprefix("torch."),
                "elements_per_token_before": before,
                "elements_per_token_after": after,
                "bytes_per_token_before": before * element_size,
                "bytes_per_token_after": after * element_size,
                "elements_per_token_per_layer_before": plan.source_elements_per_layer,
                "elements_per_token_per_layer_after": plan.target_elements_per_layer,
                "ratio": after / before,
            },
            "layers": layer_reports,
        }
        if eval_text is not None:
            report["evaluation"] = _evaluate(source, tmp, eval_text, options, progress)
        report["wall_time_s"] = round(time.time() - started, 2)
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        (tmp / "conversion.json").write_text(dump_json(report))
        build_card(report).save(tmp / "README.md")
    log(f"wrote {out} in {report['wall_time_s']:.1f}s (peak RSS {report['peak_rss_mb']:.0f} MB)")
    return report


def _summary(plan: TargetPlan) -> str:
    cfg = plan.config
    if plan.target == "gta":
        return f"(groups={cfg.num_key_value_heads}, head_dim={cfg.head_dim}, rope_dim={cfg.rope_dim})"
    if plan.target == "ghla":
        return (
            f"(maps={cfg.num_maps}, key_heads={cfg.num_key_heads}, key_dim={cfg.head_dim}, "
            f"latent_dim={cfg.latent_dim})"
        )
    return (
        f"(latent_heads={cfg.num_latent_heads}, kv_rank={cfg.kv_lora_rank}, rope_dim={cfg.qk_rope_head_dim}, "
        f"nope_dim={cfg.qk_nope_head_dim})"
    )


def _architecture(plan: TargetPlan) -> dict:
    cfg = plan.config
    fields = {
        "gta": ("num_key_value_heads", "head_dim", "rope_dim"),
        "ghla": ("num_maps", "num_key_heads", "head_dim", "latent_dim", "v_head_dim"),
    }.get(plan.target, ("num_latent_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    return {"model_type": cfg.model_type, **{name: getattr(cfg, name) for name in fields}}


def _inputs(src: str | Path | None, options: ConvertOptions) -> list[tuple[Path, str]]:
    """Local files the conversion reads: OUT must never hold one of them (--force would delete it)."""
    named = [(src, "the source model"), (options.calib, "the --calib text"), (options.eval_text, "the --eval-text")]
    return [(Path(p).expanduser(), what) for p, what in named if p is not None and Path(p).expanduser().exists()]


def _read_eval_text(options: ConvertOptions) -> str | None:
    if options.eval_text is None:
        return None
    if options.eval_window < 2:
        raise GtakitError(f"--eval-window must be at least 2 tokens, got {options.eval_window}")
    if options.eval_tokens < options.eval_window:
        raise GtakitError(f"--eval-tokens {options.eval_tokens} is less than one --eval-window of "
                          f"{options.eval_window}; raise --eval-tokens or lower --eval-window")
    return read_text(options.eval_text, option="--eval-text")


def _evaluate(source: SourceModel, folder: Path, text: str, options: ConvertOptions, progress: bool) -> dict:
    from gtakit.evaluate import load_model, perplexity

    tokenizer = source.load_tokenizer()
    converted = load_model(str(folder))[0]
    window = options.eval_window
    result = perplexity(converted, tokenizer, text, options.eval_tokens, window=window, progress=progress)
    del converted
    source_model = source.load_model(torch.float32)
    source_result = perplexity(source_model, tokenizer, text, options.eval_tokens, window=window, progress=progress)
    return {
        "text": str(options.eval_text),
        "tokens": result["tokens"],
        "window": result["window"],
        "perplexity": result["perplexity"],
        "source_perplexity": source_result["perplexity"],
    }
