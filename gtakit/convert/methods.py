"""Initialisation methods: each is one function mapping a source layer (and its calibration statistics, if
any) to the `LayerMetric` under which `decompose.py` compresses it. Register new ones in `INIT_METHODS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gtakit.errors import GtakitError

from .decompose import LayerMetric
from .rope import SourceAttention


@dataclass(frozen=True)
class InitMethod:
    name: str
    build_metric: Callable[[SourceAttention, object | None], LayerMetric]
    needs_calibration: bool
    help: str


def svd_metric(src: SourceAttention, stats: object | None) -> LayerMetric:
    """Weight-only: joint SVD of no-RoPE key and value weights, RoPE components ranked by weight norms."""
    return LayerMetric(input_cov=None, balance=True)


INIT_METHODS: dict[str, InitMethod] = {
    "svd": InitMethod(
        "svd", svd_metric, needs_calibration=False, help="weight-only joint SVD of keys and values (needs no data)"
    ),
}

DEFAULT_INIT = "svd"


def get_init_method(name: str) -> InitMethod:
    if name not in INIT_METHODS:
        raise GtakitError(f"unknown --init {name!r}; choose one of: {', '.join(INIT_METHODS)}")
    return INIT_METHODS[name]
