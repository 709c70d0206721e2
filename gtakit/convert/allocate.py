"""Per-layer budget allocation (`--allocate error`): the same total KV cache, spent where it matters.

Before converting, every layer is converted at several widths of its form's width setting (`width_candidates`:
the latent width of GLA/MLA and GHLA, the tied-state groups of GTA) and, where the output format allows, kept in
source form. Each candidate's converted attention runs on the inputs the source attention receives on
`--allocate-tokens` calibration tokens (with the output refit when it is on), and its error is

    e = sum |converted output - source output|^2 / sum |layer input|^2

the squared error it adds to the residual stream, relative to that stream (so layers are comparable). A dynamic
programme then picks one candidate per layer minimising the summed error under the uniform plan's total cache
elements per token. The result is a list of `--layer` settings, so a user can rerun or edit it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError
from gtakit.forms import TensorNames
from gtakit.io.source import SourceModel
from gtakit.models import SOURCE_FORM, layer_cache_elements

from .calibration import CalibrationLayer, collect_layer_statistics
from .layer import convert_attention
from .options import ConvertOptions, parse_layer_overrides
from .plan import ConversionPlan, LayerPlan, plan_layer
from .refine import build_attention, output_moments, refit_holdout, refitted_weight, resolve_refit, resolve_ridge

ALLOCATIONS = ("none", "error")


@dataclass
class Candidate:
    settings: dict  # --layer settings ({} = as planned; {"target": "source"} = the source's own attention)
    elements: int  # cache elements per token of the layer
    error: float = 0.0

    @property
    def label(self) -> str:
        if self.settings.get("target") == SOURCE_FORM:
            return SOURCE_FORM
        return ",".join(f"{key}={value}" for key, value in self.settings.items()) or "as planned"


def check_allocation(options: ConvertOptions, calibrated: bool) -> None:
    if options.allocate not in ALLOCATIONS:
        raise GtakitError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got {options.allocate!r}")
    if options.allocate != "none" and not calibrated:
        raise GtakitError("--allocate error measures the layers on calibration text: pass --calib FILE")
    if options.allocate_tokens < 1024:
        raise GtakitError(f"--allocate-tokens must be at least 1024, got {options.allocate_tokens}")


def layer_candidates(plan: ConversionPlan, index: int, source_allowed: bool) -> list[tuple[Candidate, LayerPlan | None]]:
    """The widths layer `index` may take (each with its plan), cheapest first; invalid settings are skipped."""
    layer = plan.layers[index]
    shape = plan.layer_shape(index)
    found: dict[int, tuple[Candidate, LayerPlan | None]] = {}
    for settings in layer.form.width_candidates(shape, layer.spec):
        try:
            candidate_plan = plan_layer(shape, layer.options, settings, index)
        except GtakitError:
            continue
        elements = layer_cache_elements(candidate_plan.spec, plan.source_config)
        if source_allowed and elements >= shape.cache_elements:
            continue  # the source's own attention costs no more and has no error
        found.setdefault(elements, (Candidate(settings, elements), candidate_plan))
    if source_allowed:
        found.setdefault(shape.cache_elements, (Candidate({"target": SOURCE_FORM}, shape.cache_elements), None))
    return [found[elements] for elements in sorted(found)]


def cheapest_allocation(elements: list[list[int]], errors: list[list[float]], budget: int) -> list[int]:
    """Per layer the index of one candidate, minimising the summed error with at most `budget` elements in all
    (exact: a knapsack over the elements in units of their greatest common divisor). Ties go to the cheaper."""
    unit = 0
    for value in [budget] + [e for row in elements for e in row]:
        unit = gcd(unit, value)
    unit = max(unit, 1)
    slots = budget // unit
    inf = float("inf")
    best = torch.zeros(slots + 1, dtype=torch.float64)  # best[b]: least error of the layers so far within b units
    choices = []
    for row_elements, row_errors in zip(elements, errors):
        new = torch.full_like(best, inf)
        choice = torch.full((slots + 1,), -1, dtype=torch.int64)
        for k, (cost, error) in enumerate(zip(row_elements, row_errors)):
            cost //= unit
            if cost > slots:
                continue
            trial = torch.full_like(best, inf)
            trial[cost:] = best[: slots + 1 - cost] + error
            better = trial < new
            new = torch.where(better, trial, new)
            choice = torch.where(better, torch.full_like(choice, k), choice)
        best = new
        choices.append(choice)
    if not torch.isfinite(best[slots]):
        raise GtakitError("no per-layer allocation fits the budget")
    picked, remaining = [], slots
    for layer in range(len(elements) - 1, -1, -1):
        k = int(choices[layer][remaining])
        picked.append(k)
        remaining -= elements[layer][k] // unit
    return picked[::-1]


@torch.no_grad()
def measure_candidates(plan: ConversionPlan, source: SourceModel, method, layer: CalibrationLayer,
                       candidates: list[tuple[Candidate, LayerPlan | None]], refit: bool,
                       ridge: float | str = "auto") -> None:
    """Fill in each candidate's error (see the module's docstring) on the calibration tokens of `layer`."""
    index, stats = layer.index, layer.stats
    residual = layer.hidden_energy()
    chosen_ridge = resolve_ridge(ridge)
    holdout = refit_holdout(layer) if chosen_ridge is None else None
    pairs = list(layer.pairs_then_next_layer())
    for candidate, candidate_plan in candidates:
        if candidate_plan is None:  # the source's own attention
            continue
        converted = convert_attention(plan.family, source, index, candidate_plan, method, stats)
        spec = {**candidate_plan.spec, **converted.spec_updates}
        module = build_attention(plan.source_config, spec, index, converted.tensors).to(layer.device)
        moments = output_moments(module, pairs, holdout=holdout)
        o_weight = converted.tensors[TensorNames(module).o_proj.weight]
        weight = refitted_weight(moments, o_weight, chosen_ridge)[0] if refit else module.o_proj.weight
        candidate.error = moments.error(weight) * moments.target_energy / max(residual, 1e-30)


def allocate_budget(source: SourceModel, plan: ConversionPlan, options: ConvertOptions, method,
                    source_allowed: bool, progress: bool = False) -> tuple[list[str], dict]:
    """`--layer` settings spending `plan`'s total cache per token across its layers (see the module's docstring),
    and the report of what was measured."""
    fixed = set(parse_layer_overrides(options.layers, len(plan.layers)))
    calibrator = collect_layer_statistics(source, replace(options, calib_tokens=options.allocate_tokens),
                                          family=plan.family)
    refit = resolve_refit(options.refit, True) == "output"
    tables: list[list[Candidate]] = []
    tokens = 0
    for index, layer in enumerate(tqdm(plan.layers, desc="allocating", disable=not progress)):
        live = calibrator.layer(index)
        tokens = live.stats.tokens
        if index in fixed or layer.form is None:
            tables.append([Candidate({}, plan.layer_elements[index])])
            continue
        candidates = layer_candidates(plan, index, source_allowed)
        measure_candidates(plan, source, method, live, candidates, refit, options.refit_ridge)
        tables.append([candidate for candidate, _ in candidates])
    calibrator.finish()
    budget = plan.target_elements_per_token
    picked = cheapest_allocation([[c.elements for c in row] for row in tables],
                                 [[c.error for c in row] for row in tables], budget)
    # Layers that keep their planned width need no setting.
    settings = [f"{index}:{row[k].label}" for index, (row, k) in enumerate(zip(tables, picked))
                if index not in fixed and (row[k].label == SOURCE_FORM or row[k].elements != plan.layer_elements[index])]
    uniform = [next((c.error for c in row if c.elements == plan.layer_elements[i]), None)
               for i, row in enumerate(tables)]
    report = {
        "method": options.allocate, "tokens": tokens, "budget_elements_per_token": budget,
        "elements_per_token": sum(row[k].elements for row, k in zip(tables, picked)),
        "error_uniform": _total(uniform), "error_allocated": sum(row[k].error for row, k in zip(tables, picked)),
        "layer_settings": settings,
        "layers": [{"layer": index, "chosen": row[k].label if index not in fixed else "fixed by --layer",
                    "errors": {f"{c.label} ({c.elements})": round(c.error, 8) for c in row}}
                   for index, (row, k) in enumerate(zip(tables, picked))],
    }
    return settings, report


def _total(errors: list[float | None]) -> float | None:
    return None if any(e is None for e in errors) else sum(errors)


__all__ = ["ALLOCATIONS", "Candidate", "allocate_budget", "check_allocation", "cheapest_allocation",
           "layer_candidates", "measure_candidates"]
