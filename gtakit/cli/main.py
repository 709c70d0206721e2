"""`gtakit` command: convert, eval, push, finetune, bench."""

from __future__ import annotations

import typer

from gtakit import __version__

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
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_version_callback,
                                 is_eager=True),
) -> None:
    """gtakit: grouped-tied and grouped-latent attention for pretrained LLMs."""
