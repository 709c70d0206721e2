"""Uptraining of converted models (`gtakit finetune`): recipes, data packing, training modes, export."""

from .recipe import Recipe, describe_schema, load_recipe
from .shipped import find_recipe, list_recipes
from .trainer import finetune

__all__ = ["Recipe", "describe_schema", "find_recipe", "finetune", "list_recipes", "load_recipe"]
