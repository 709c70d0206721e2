"""Uptraining of converted models (`gtakit finetune`): recipes, data packing, training modes, export."""

from .recipe import Recipe, describe_schema, load_recipe
from .shipped import find_recipe, list_recipes
from .trainer import finetune


def run_recipe(recipe: str, overrides: list[str], resume: bool = False, progress: bool = True, log=print):
    """A recipe file (or the name of a shipped one) with dotted overrides, run: (recipe, report)."""
    from pathlib import Path

    path = Path(recipe)
    if not path.exists() and "/" not in recipe and not recipe.endswith((".yaml", ".yml")):
        path = find_recipe(recipe)
    parsed = load_recipe(path, overrides)
    return parsed, finetune(parsed, resume=resume, progress=progress, log=log)


__all__ = ["Recipe", "describe_schema", "find_recipe", "finetune", "list_recipes", "load_recipe", "run_recipe"]
