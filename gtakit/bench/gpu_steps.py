"""The steps of `gtakit bench gpu`, each run in its own child process by gtakit.bench.gpu.

Each step takes a StepContext and records its results with `ctx.record(...)`, which rewrites OUT/<step>.json at
once: a step killed at its time limit keeps what it had recorded. `--dry-run` runs every step on the CPU at tiny
shapes (a tiny random Llama with a word-level tokenizer instead of SmolLM2, the kernels under TRITON_INTERPRET=1)
and makes no timing claims. Heavy imports stay inside the functions: the parent imports this module to list the
steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TINY_VOCAB = 256
# Generate: (batch, context) cases on the GPU (long context; large batch), new tokens per timed generate.
GENERATE_CASES = [(32, 8192), (256, 1024)]
GENERATE_TINY_CASES = [(2, 32)]
FIT_CONTEXT, FIT_BUDGET_GIB = 4096, 8.0
# Decode: the kernel grid on the GPU (the dry run's shapes are fixed by decode.py's --interpret).
DECODE_GRID = ["--batch", "8,32", "--context", "1024,8192,32768", "--q-len", "1,2,4", "--rep", "50"]
CALIB_TOKENS, CALIB_SEQ = 65536, 2048


@dataclass
class StepContext:
    """What a step needs; picklable (it crosses into the child process)."""

    name: str
    out: Path
    scratch: Path
    dry_run: bool
    model: str | None = None
    text: str | None = None
    results: dict = field(default_factory=dict)

    def record(self, **values: Any) -> None:
        """Merge `values` into this step's results and rewrite OUT/<name>.json (atomically)."""
        self.results.update(values)
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(path)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


class StepFailed(Exception):
    """The step ran but its check failed (the parent records it as failed, with what was recorded)."""


# ------------------------------------------------------------------------------------------------ sources


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<pad>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _write_tiny_source(folder: Path) -> None:
    """A 2-layer Llama (6 heads over 3 KV heads, so GLA-3 applies) with a tokenizer, and a text of its words."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    words = torch.randint(3, TINY_VOCAB, (6000,), generator=torch.Generator().manual_seed(1))
    (folder / "text.txt").write_text(" ".join(f"w{int(i)}" for i in words))


def _random_weights(config_folder: Path, folder: Path) -> None:
    """A config-only folder (SmolLM2's config and tokenizer, carried without weights) with random bf16 weights:
    decode, calibration and training speed do not depend on the weights' values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for item in config_folder.iterdir():
        if item.is_file() and not (folder / item.name).exists():
            shutil.copy(item, folder / item.name)


def source_path(ctx: StepContext) -> str | None:
    """The source every model step uses, made once per run in the shared scratch folder when it must be built
    (tiny model; random weights for a config-only folder). None = the bundled SmolLM2 GGUF."""
    if not ctx.dry_run and ctx.model is None:
        return None
    model = Path(ctx.model) if ctx.model else None
    if model is not None and (model.is_file() or any(model.glob("*.safetensors")) or any(model.glob("*.bin"))):
        return str(model)
    built = ctx.scratch / "source"
    if not built.exists():
        tmp = ctx.scratch / f"source.{os.getpid()}"
        _write_tiny_source(tmp) if model is None else _random_weights(model, tmp)
        tmp.rename(built)
    return str(built)


def source_text(ctx: StepContext) -> str | None:
    if ctx.text:
        return ctx.text
    tiny = ctx.scratch / "source" / "text.txt"
    return str(tiny) if ctx.dry_run and tiny.exists() else None


def half_kv_options(config) -> dict[str, dict]:
    """Conversions at about 50% of the source's KV cache (GTA at its default, which is its smallest useful
    cache): GLA-3 and MLA with a RoPE key of min(64, d) and the rest as latent, as in benchmarks/RESULTS.md."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    budget = config.num_key_value_heads * head_dim  # half of K + V
    rope = min(64, head_dim)
    return {
        "gta": dict(target="gta"),
        "gla3": dict(target="gla", latent_heads=3, kv_rank=(budget - rope) // 3, rope_dim=rope),
        "mla": dict(target="mla", kv_rank=budget - rope, rope_dim=rope),
    }


# ------------------------------------------------------------------------------------------------ steps


def step_env(ctx: StepContext) -> None:
    """Device and versions (in a child, so that the parent never initialises CUDA before forking)."""
    import platform

    import torch
    import transformers

    import gtakit

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda, gtakit=gtakit.__version__, cuda_available=torch.cuda.is_available())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    ctx.record(**info, summary=f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}")
    if not ctx.dry_run and not info["cuda_available"]:
        raise StepFailed("CUDA is not available")


def gpu_test_files(root: Path) -> list[str]:
    """Test files holding GPU-marked tests: collecting only these keeps the step short and away from files that
    need packages the GPU machine may lack (gguf)."""
    return sorted(str(p) for p in (root / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text() and p.name != "test_bench_gpu.py")  # not itself


def step_tests(ctx: StepContext) -> None:
    """`pytest -m gpu` over the GPU-marked tests; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    import pytest

    files = gpu_test_files(Path.cwd())
    if not files:
        ctx.record(summary="no tests/ folder here (run from a gtakit checkout)")
        raise StepFailed("no GPU-marked tests found under ./tests")
    report = ctx.scratch / "junit.xml"
    code = pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files])
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ctx.record(files=files, exit_code=int(code), passed=passed, failed_tests=failed, **counts,
               summary=f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped")
    if counts["failures"] or counts["errors"] or (not ctx.dry_run and passed == 0):
        raise StepFailed(f"pytest -m gpu: {ctx.results['summary']}")


def _decode_rows(rows: list[dict], layout: str) -> list[dict]:
    """Adds the layout and the speed-up over the PyTorch absorbed MLA path of the same case."""
    torch_ms = {(r["batch"], r["context"], r["q_len"]): r["ms"] for r in rows
                if r["method"] == "mla_torch" and isinstance(r.get("ms"), float)}
    for row in rows:
        row["layout"] = layout
        base = torch_ms.get((row["batch"], row["context"], row["q_len"]))
        if base and isinstance(row.get("ms"), float) and row["method"] in ("gta", "gla2", "mla"):
            row["vs_mla_torch"] = f"{base / row['ms']:.2f}x"
    return rows


def step_decode(ctx: StepContext) -> None:
    """gtakit.bench.decode, contiguous then paged (page 64), in this process."""
    from gtakit.bench.decode import main as bench_decode

    grid = ["--interpret"] if ctx.dry_run else DECODE_GRID
    # The interpreter is slow: the dry run's paged pass times one kernel (its kernel check covers all three).
    paged = ["--page-size", "16", "--methods", "gqa_sdpa,gta,mla_torch"] if ctx.dry_run else ["--page-size", "64"]
    rows, meta = [], {}
    for layout, extra in (("contiguous", []), ("paged", paged)):
        path = ctx.scratch / f"decode-{layout}.json"
        code = bench_decode([*grid, *extra, "--json", str(path)])
        if code != 0:
            raise StepFailed(f"bench decode ({layout}) exited with {code}")
        data = json.loads(path.read_text())
        rows += _decode_rows(data["rows"], layout)
        meta = data["meta"]
        ctx.record(copy_gbps=meta.get("copy_gbps"), kernel_rel_errors=meta.get("kernel_rel_errors"), rows=rows)
    timed = [r for r in rows if isinstance(r.get("ms"), float)]
    ctx.record(summary=f"{len(timed)} cases timed, copy {meta.get('copy_gbps') or 0:.0f} GB/s")


def _load_generate_models(source, device, dtype, backend: str):
    """name -> (model, KV bytes per token over all layers): the source and its ~50% KV conversions."""
    import torch

    from gtakit.convert import ConvertOptions, convert_in_memory

    cfg = source.config
    elsize = torch.empty((), dtype=dtype).element_size()
    models = {"source": (source.load_model(), 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers)}
    for name, options in half_kv_options(cfg).items():
        model, _ = convert_in_memory(source, ConvertOptions(init="svd", **options))
        model.set_decode_backend(backend)
        models[name] = (model, model.kv_cache_elements_per_token())
    return {name: (m.to(device=device, dtype=dtype).eval(), n * elsize) for name, (m, n) in models.items()}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_seconds(model, prompt, new_tokens: int) -> float:
    import torch

    _sync(prompt.device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(prompt.device)
    return time.perf_counter() - start


def time_generate(model, batch: int, context: int, new_tokens: int, device, repeats: int = 2) -> dict:
    """Decode tokens/s = batch (N - 1) / (t(N) - t(1)) (the 1-token run is the prefill), min of `repeats`, and
    the peak memory of the run."""
    import torch

    prompt = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    _generate_seconds(model, prompt[:, :16], 2)  # warm-up: kernels compiled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill = min(_generate_seconds(model, prompt, 1) for _ in range(repeats))
    total = min(_generate_seconds(model, prompt, new_tokens) for _ in range(repeats))
    row = {"prefill_s": round(prefill, 4)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if total <= prefill:
        return dict(row, decode_tok_s="noisy")
    return dict(row, decode_tok_s=round(batch * (new_tokens - 1) / (total - prefill), 1),
                ms_per_step=round(1e3 * (total - prefill) / (new_tokens - 1), 3))


def largest_batch(model, context: int, device, max_batch: int, start: int = 1) -> int:
    """Largest power-of-two batch whose prefill + 4 decode steps run (0: none); OOM ends the doubling."""
    import gc

    import torch

    best, batch = 0, start
    while batch <= max_batch:
        try:
            _generate_seconds(model, torch.randint(3, model.config.vocab_size, (batch, context), device=device), 4)
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best, batch = batch, batch * 2
    return best


def _speedups(rows: list[dict]) -> None:
    base = {(r["batch"], r["context"]): r["decode_tok_s"] for r in rows
            if r["model"] == "source" and isinstance(r.get("decode_tok_s"), float)}
    for row in rows:
        ref = base.get((row["batch"], row["context"]))
        if ref and isinstance(row.get("decode_tok_s"), float):
            row["speedup"] = f"{row['decode_tok_s'] / ref:.2f}x"


def _fits(ctx: StepContext, models: dict, device) -> list[dict]:
    """Per model: the largest batch at FIT_CONTEXT under a FIT_BUDGET_GIB memory cap (weights included)."""
    import torch

    context, cap, start = (32, 4, 1) if ctx.dry_run else (FIT_CONTEXT, 1024, 8)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, FIT_BUDGET_GIB * 2**30 / total), device)
    for model, _ in models.values():  # only the measured model's weights count against the budget
        model.to("cpu")
    fits = []
    for name, (model, _) in models.items():
        model.to(device)
        best = largest_batch(model, context, device, cap, start)
        model.to("cpu")
        fits.append(dict(model=name, context=context, budget_gib=FIT_BUDGET_GIB if device.type == "cuda" else None,
                         max_batch=best, max_batch_x_context=best * context))
        ctx.record(fits=fits)
    return fits


def step_generate(ctx: StepContext) -> None:
    """`generate` end to end: the source against its GTA / GLA-3 / MLA conversions at about 50% KV."""
    import gc

    import torch

    from gtakit.io.source import open_source

    source = open_source(source_path(ctx))
    device = torch.device(ctx.device)
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    models = _load_generate_models(source, device, dtype, backend="auto")
    ctx.record(kv_bytes_per_token={name: kv for name, (_, kv) in models.items()})
    rows = []
    cases, new_tokens = (GENERATE_TINY_CASES, 4) if ctx.dry_run else (GENERATE_CASES, 64)
    for batch, context in cases:
        for name, (model, kv_bytes) in models.items():
            row = dict(model=name, kv_bytes_per_token=kv_bytes, batch=batch, context=context)
            try:
                row.update(time_generate(model, batch, context, new_tokens, device))
            except torch.OutOfMemoryError:
                row["decode_tok_s"] = "OOM"
            gc.collect()
            rows.append(row)
            _speedups(rows)
            ctx.record(rows=rows)
    fits = _fits(ctx, models, device)
    best = max(fits, key=lambda f: f["max_batch"])
    ctx.record(summary=f"{len(rows)} runs; largest batch at {best['context']}: {best['model']} {best['max_batch']}")


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _compare_calibration(source, ids, device: str) -> dict:
    """Statistics of the first two layers on the CPU and on `device`, relative differences."""
    from gtakit.convert.calibration import LayerwiseCalibrator

    on_cpu, on_device = LayerwiseCalibrator(source, ids, device="cpu"), LayerwiseCalibrator(source, ids, device=device)
    cov, rot = [], []
    for index in range(min(2, source.config.num_hidden_layers)):
        a, b = on_cpu(index), on_device(index)
        cov.append(_rel(b.input_cov, a.input_cov))
        if a.rotation_cos is not None:
            rot.append(float((b.rotation_cos.double() - a.rotation_cos.double()).abs().max()))
    return dict(input_cov_rel_err=max(cov), rotation_cos_max_abs_err=max(rot, default=0.0),
                equal=max(cov) < 1e-3 and max(rot, default=0.0) < 1e-3, sample_tokens=ids.numel())


def _calibration_ids(source, text: str | None, tokens: int, seq_len: int):
    """Token ids of the text when there is one, else random ids (the statistics' speed does not depend on them)."""
    import torch

    from gtakit.convert.calibration import calibration_ids

    if text:
        return calibration_ids(source, text, tokens, seq_len)
    rows = max(1, tokens // seq_len)
    return torch.randint(3, source.config.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))


def step_calibration(ctx: StepContext) -> None:
    """CPU and CUDA statistics on a small sample must agree; then one full calibration pass on the device and one
    calibrated (aware) GLA-3 conversion, timed."""
    import torch

    from gtakit.convert import ConvertOptions, convert_in_memory
    from gtakit.convert.calibration import LayerwiseCalibrator
    from gtakit.io.source import open_source

    source, text = open_source(source_path(ctx)), source_text(ctx)
    tokens, seq_len = (2048, 256) if ctx.dry_run else (CALIB_TOKENS, CALIB_SEQ)
    ctx.record(compare=_compare_calibration(source, _calibration_ids(source, text, 2048, 256), ctx.device))
    ids = _calibration_ids(source, text, tokens, seq_len)
    _sync(torch.device(ctx.device))
    start = time.perf_counter()
    calibrator = LayerwiseCalibrator(source, ids, device=ctx.device)
    for index in range(source.config.num_hidden_layers):
        calibrator(index)
    _sync(torch.device(ctx.device))
    seconds = time.perf_counter() - start
    ctx.record(statistics_s=round(seconds, 2), statistics_tokens=ids.numel(),
               statistics_tok_s=round(ids.numel() / seconds, 1))
    if text:
        options = ConvertOptions(init="aware", calib=text, calib_tokens=tokens, calib_seq_len=seq_len,
                                 calib_device=ctx.device, **half_kv_options(source.config)["gla3"])
        start = time.perf_counter()
        convert_in_memory(source, options)
        ctx.record(aware_conversion="gla3", aware_conversion_s=round(time.perf_counter() - start, 2))
    equal = ctx.results["compare"]["equal"]
    ctx.record(summary=f"{ids.numel()} tokens in {seconds:.1f} s; CPU == {ctx.device}: {equal}")
    if not equal:
        raise StepFailed("CUDA calibration statistics differ from the CPU's")


def _uptrain_recipe(ctx: StepContext, model: Path, text: str | None) -> dict:
    train = (dict(max_steps=6, seq_len=64, micro_batch=2) if ctx.dry_run
             else dict(max_steps=40, seq_len=1024, micro_batch=8))
    return dict(
        model=dict(path=str(model)),
        data=dict(train=[text], eval_sequences=2),
        train=dict(mode="full", grad_accum=1, lr=3e-4, warmup_steps=2, schedule="constant", precision="bf16",
                   **train),
        eval=dict(every=0, batch=2), checkpoint=dict(every=0, keep=1), log=dict(every=1),
        output=dict(dir=str(ctx.scratch / "uptrained"), force=True),
    )


def step_uptrain(ctx: StepContext) -> None:
    """A short bf16 (autocast) full uptraining of the GLA-3 50% conversion through `gtakit finetune`'s trainer:
    tokens/s and whether the loss falls."""
    from gtakit.convert import ConvertOptions, convert
    from gtakit.finetune import finetune, load_recipe
    from gtakit.io.source import open_source

    src, text = source_path(ctx), source_text(ctx)
    if text is None:
        raise StepFailed("no training text: pass --text FILE")
    converted = ctx.scratch / "uptrain-model"
    options = half_kv_options(open_source(src).config)["gla3"]
    convert(src, converted, ConvertOptions(init="svd", **options), force=True, progress=False)
    report = finetune(load_recipe(_uptrain_recipe(ctx, converted, text)), progress=False, log=print)
    losses = [h["loss"] for h in report["history"]]
    rates = [h["tokens_per_s"] for h in report["history"][2:] if "tokens_per_s" in h]  # after the warm-up steps
    k = max(1, len(losses) // 4)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    tok_s = statistics.median(rates) if rates else float("nan")
    ctx.record(steps=len(losses), tokens=report["history"][-1]["tokens"], losses=[round(x, 4) for x in losses],
               loss_first=round(first, 4), loss_last=round(last, 4), loss_falls=last < first,
               tokens_per_s=round(tok_s, 1) if math.isfinite(tok_s) else None,
               summary=f"{tok_s:,.0f} tok/s, loss {first:.3f} -> {last:.3f}")
    if not ctx.dry_run and not last < first:
        raise StepFailed("the loss did not fall")


def run_step(function, ctx: StepContext, log_path: Path) -> None:
    """Child entry point: output to the step's log, failures recorded in its JSON, exit code 1 on failure."""
    import traceback

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    code = 0
    try:
        function(ctx)
    except StepFailed as err:
        ctx.record(error=str(err))
        code = 1
    except BaseException as err:  # noqa: BLE001 - anything a step raises is a result to record
        traceback.print_exc()
        ctx.record(error=f"{type(err).__name__}: {err}")
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # no atexit handlers of the forked interpreter (e.g. CUDA teardown) can hang the step
