"""Export a gtakit MLA (just converted, or a converted/uptrained folder) as a native DeepSeek-V3 checkpoint, and
check the written folder in transformers' own `DeepseekV3ForCausalLM` against the gtakit model.

    gtakit convert SRC --to mla --format deepseek-v3 --calib wiki.txt -o OUT
    gtakit export FOLDER --format deepseek-v3 --calib wiki.txt -o OUT
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gtakit.errors import GtakitError
from gtakit.formats import check_shard_size, deepseek_v3
from gtakit.formats.card import build_card, dump_json
from gtakit.io import DTYPES
from gtakit.io.output import OutputFolder
from gtakit.io.text import check_text_file

from .calibration import is_local_text, text_ids
from .options import ConvertOptions, check_options

FORMATS = ("gtakit", "deepseek-v3")
CHECK_ROWS = 1  # calibration sequences held out of the fit to measure the export on


def check_export_options(options: ConvertOptions) -> None:
    """Refuse, before any work, what the export cannot do."""
    if options.output_format not in FORMATS:
        raise GtakitError(f"--format must be one of {', '.join(FORMATS)}, got {options.output_format!r}")
    defaults = ConvertOptions()
    if options.output_format == "gtakit":
        set_here = [flag for name, flag in (("latent_norm", "--latent-norm"), ("norm_tokens", "--norm-tokens"))
                    if getattr(options, name) != getattr(defaults, name)]
        if set_here:
            raise GtakitError(f"{', '.join(set_here)} apply to --format deepseek-v3 only")
        return
    if options.latent_norm not in deepseek_v3.LATENT_NORMS:
        raise GtakitError(f"--latent-norm must be one of {', '.join(deepseek_v3.LATENT_NORMS)}, got "
                          f"{options.latent_norm!r}")
    if not options.calib:
        raise GtakitError("--format deepseek-v3 fits the format's latent norm on text: pass --calib FILE")
    if options.norm_tokens < 1024:
        raise GtakitError(f"--norm-tokens {options.norm_tokens} is too few; use at least 1024")


def norm_ids(tokenizer, options: ConvertOptions) -> torch.Tensor:
    """Calibration rows for the latent norm (the last one is held out to measure the export)."""
    ids = text_ids(tokenizer, options.calib, options.norm_tokens, min(options.calib_seq_len, 2048))
    if len(ids) < 2:
        seq = max(16, ids.numel() // 2)
        ids = ids.flatten()[: 2 * seq].view(2, seq)
    return ids


def export_model(model, folder: Path, ids: torch.Tensor, options: ConvertOptions, dtype: torch.dtype,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    """Write `model` (a gtakit MLA, float32) into `folder` as DeepSeek-V3; returns the report's `export` section."""
    started = time.time()
    geo = deepseek_v3.geometry(model.config)
    if options.latent_norm == "anchor" and dtype == torch.float16:
        raise GtakitError("--latent-norm anchor needs a bias far above any latent norm, beyond float16's range; "
                          "use --dtype bfloat16 or float32")
    fit, held_out = ids[:-CHECK_ROWS], ids[-CHECK_ROWS:]
    moments = deepseek_v3.collect_moments(model, fit, options.latent_norm, log)
    ds_config, fits = deepseek_v3.write_deepseek_v3(model, folder, dtype, options.latent_norm, moments,
                                                    options.max_shard_size)
    log("checking the export in transformers' DeepseekV3ForCausalLM")
    check = compare_with_native(model, folder, held_out)
    layers = [{"layer": i, "latent_rms_cv": round(m.rms_spread, 4),
               "attention_rel_error": float(f"{check['attention_rel_error'][i]:.4g}")} for i, m in enumerate(moments)]
    for layer, refit in zip(layers, fits):
        layer.update(ballast_weight=refit.weight, kv_fit_rel_error=float(f"{refit.residual:.4g}"))
    return {
        "format": "deepseek-v3",
        "latent_norm": options.latent_norm,
        "kv_lora_rank": ds_config.kv_lora_rank,
        "qk_rope_head_dim": geo.rope,
        "q_lora_rank": ds_config.q_lora_rank,
        "rope_grid_stride": geo.stride,
        "rope_theta": geo.theta,
        "query_scale_folded": geo.query_scale,
        "cache_elements_per_token_per_layer": ds_config.kv_lora_rank + geo.rope,
        "engines": engines(options.latent_norm, ds_config),
        "fit_tokens": int(fit.numel()),
        "check_tokens": int(held_out.numel()),
        "logits_max_abs_diff": check["logits_max_abs_diff"],
        "logits_max_abs": check["logits_max_abs"],
        "kl_per_token": check["kl_per_token"],
        "top1_agreement": check["top1_agreement"],
        "layers": layers,
        "wall_time_s": round(time.time() - started, 2),
    }


def engines(variant: str, ds_config: Any) -> str:
    """Which engines compute what the export means (from the format's constraints in the research notes)."""
    width = ds_config.kv_lora_rank + ds_config.qk_rope_head_dim
    if variant == "anchor":
        return "transformers only (the anchor is a bias; vLLM and llama.cpp drop attention biases)"
    vllm = ("vLLM MLA (GPU and CPU_MLA backends take 512 + 64)" if width == 576 else
            f"vLLM only with VLLM_MLA_DISABLE=1 (its MLA kernels take latent 512 + RoPE 64, i.e. --kv-rank 511 "
            f"--rope-dim 64 as the export adds one latent coordinate; this is {width})")
    llama_cpp = "llama.cpp" + ("" if ds_config.q_lora_rank or ds_config.num_hidden_layers in (26, 27) else
                               " (after writing q_lora_rank = 0 into the GGUF: benchmarks/llama_cpp_check.py)")
    return f"transformers, {llama_cpp}, {vllm}"


@torch.no_grad()
def compare_with_native(model, folder: Path, ids: torch.Tensor) -> dict:
    """Load `folder` with transformers' own DeepSeek-V3 code and compare it with `model` on `ids`: each layer's
    attention output on the gtakit model's own attention inputs, and the final logits."""
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if type(native).__name__ != "DeepseekV3ForCausalLM":
        raise RuntimeError(f"the export loaded as {type(native).__name__}, not DeepseekV3ForCausalLM")
    ours = deepseek_v3.attention_modules(model)
    theirs = [layer.self_attn for layer in native.model.layers]
    inputs, expected, got = {}, {}, {}
    handles = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        handles.append(a.register_forward_pre_hook(_capture_input(inputs, i), with_kwargs=True))
        handles.append(a.register_forward_hook(_capture_output(expected, i)))
        handles.append(b.register_forward_pre_hook(_replace_input(inputs, i), with_kwargs=True))
        handles.append(b.register_forward_hook(_capture_output(got, i)))
    try:  # the native attentions run on gtakit's attention inputs here, so only gtakit's logits are kept
        reference = model(input_ids=ids, use_cache=False).logits
        native(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    logits = native(input_ids=ids, use_cache=False).logits
    del native
    errors = [float((got[i] - expected[i]).norm() / expected[i].norm().clamp(min=1e-30)) for i in range(len(ours))]
    return {"attention_rel_error": errors, **_logit_agreement(reference, logits)}


def _logit_agreement(reference: torch.Tensor, logits: torch.Tensor, chunk: int = 256) -> dict:
    """Max |difference|, mean KL(reference || logits) and top-1 agreement, in float64 a few positions at a time:
    whole float64 log-probabilities of Qwen2.5's 151,936-token vocabulary over 2,048 positions were 2.5 GB each,
    and the check was killed for memory."""
    reference, logits = reference.reshape(-1, reference.shape[-1]), logits.reshape(-1, logits.shape[-1])
    diff, kl, agree = 0.0, 0.0, 0
    for start in range(0, len(reference), chunk):
        p, q = reference[start : start + chunk].double(), logits[start : start + chunk].double()
        diff = max(diff, float((q - p).abs().max()))
        log_p, log_q = p.log_softmax(-1), q.log_softmax(-1)
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        agree += int((q.argmax(-1) == p.argmax(-1)).sum())
    return {
        "logits_max_abs_diff": diff,
        "logits_max_abs": float(reference.abs().max()),
        "kl_per_token": kl / len(reference),
        "top1_agreement": agree / len(reference),
    }


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _capture_input(store: dict, index: int):
    def hook(module, args, kwargs):
        store[index] = _hidden(args, kwargs)

    return hook


def _replace_input(store: dict, index: int):
    def hook(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": store[index]}
        return (store[index], *args[1:]), kwargs

    return hook


def _capture_output(store: dict, index: int):
    def hook(module, args, output):
        store[index] = (output[0] if isinstance(output, tuple) else output).double()

    return hook


def export_folder(folder: str | Path, out: str | Path, options: ConvertOptions, force: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """`gtakit export FOLDER`: a converted (or uptrained) gtakit MLA folder -> a DeepSeek-V3 folder."""
    from gtakit.evaluate import load_model
    from gtakit.families.folders import check_model_folder

    log = log or (lambda message: None)
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if options.output_format == "gtakit":
        raise GtakitError("gtakit export writes another format: pass --format deepseek-v3")
    check_options(options)
    check_shard_size(options.max_shard_size)
    if options.dtype != "auto":
        _dtype(options, folder)  # a bad --dtype before any work
    check_export_options(options)
    if is_local_text(options.calib):  # `gtakit convert` checks its --calib itself
        check_text_file(options.calib, "--calib")
    if not (folder / "config.json").is_file():
        raise GtakitError(f"{folder} is not a converted folder (no config.json)")
    if json.loads((folder / "config.json").read_text()).get("model_type") != "gtakit":
        raise GtakitError(f"{folder} is not a gtakit folder (model_type is not 'gtakit'); convert it first")
    output = OutputFolder(out, force, protect=[(folder, "the input folder")], log=log)
    output.check()
    check_model_folder(folder)  # weights that match the config and are finite
    model, tokenizer = load_model(str(folder))
    deepseek_v3.geometry(model.config)  # refuse before reading the calibration text
    dtype = _dtype(options, folder)
    ids = norm_ids(tokenizer, options)
    report = _folder_report(folder)
    with output.staging() as tmp:
        report["export"] = export_model(model, tmp, ids, options, dtype, log)
        tokenizer.save_pretrained(tmp)
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
        write_report(tmp, report)
    log(f"wrote {out}")
    return report


def _dtype(options: ConvertOptions, folder: Path) -> torch.dtype:
    if options.dtype != "auto":
        if options.dtype not in DTYPES:
            raise GtakitError(f"--dtype must be auto, {', '.join(DTYPES)}; got {options.dtype!r}")
        return DTYPES[options.dtype]
    name = json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def _folder_report(folder: Path) -> dict:
    path = folder / "conversion.json"
    report = json.loads(path.read_text()) if path.is_file() else {"name": folder.name}
    report.pop("export", None)
    return report


def write_report(folder: Path, report: dict) -> None:
    """conversion.json and the card of an export."""
    report = {**report, "format": "deepseek-v3"}
    (folder / "conversion.json").write_text(dump_json(report))
    build_card(report).save(folder / "README.md")
