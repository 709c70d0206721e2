"""Recipes shipped inside the package (gtakit/recipes/, package data; the checkout's recipes/ links to it)."""

from __future__ import annotations

from pathlib import Path

from gtakit.errors import GtakitError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line) of every shipped recipe and accelerate config, e.g. 'accelerate/fsdp'."""
    found = []
    for path in sorted(RECIPES_DIR.rglob("*.yaml")):
        name = path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        summary = next((line.lstrip("# ").strip() for line in path.read_text().splitlines()
                        if line.startswith("#") and line.lstrip("# ").strip()), "")
        found.append((name, summary))
    return found


def find_recipe(name: str) -> Path:
    """Path of shipped recipe NAME (with or without .yaml)."""
    candidate = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not candidate.is_file():
        names = ", ".join(n for n, _ in list_recipes())
        raise GtakitError(f"no shipped recipe {name!r}; available: {names}")
    return candidate
