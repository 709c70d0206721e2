"""Initialisation methods: each is one function mapping a source layer (and its calibration statistics, if
any) to the `LayerMetric` under which `decompose.py` compresses it. Register new ones in `INIT_METHODS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gtakit.errors import GtakitError
from gtakit.families.base import SourceAttention
from gtakit.forms.linalg import LayerMetric, with_bias
from gtakit.forms.rope import nope_query


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

def resolve_init(name: str, has_calibration: bool) -> str:
    """`auto`: the downstream-aware method when calibration text is given, weight-only SVD otherwise."""
    if name == "auto":
        return "aware" if has_calibration else "svd"
    return name


def get_init_method(name: str) -> InitMethod:
    if name not in INIT_METHODS:
        raise GtakitError(f"unknown --init {name!r}; choose one of: {', '.join(INIT_METHODS)}")
    return INIT_METHODS[name]


def pca_metric(src: SourceAttention, stats) -> LayerMetric:
    """Activation PCA (TransMLA BKV-PCA-like): joint key/value PCA under the calibration input moment,
    key/value norms balanced, RoPE components ranked by measured key and query energies."""
    return LayerMetric(input_cov=stats.input_cov, input_mean=stats.input_mean, balance=True)


INIT_METHODS["pca"] = InitMethod(
    "pca", pca_metric, needs_calibration=True, help="joint key/value PCA of calibration activations"
)


def _normalised(weight: torch.Tensor) -> torch.Tensor:
    """Scale to unit mean eigenvalue and add a small ridge so the weight stays invertible."""
    scale = torch.trace(weight) / weight.shape[0]
    if scale <= 0:
        return torch.eye(weight.shape[0], dtype=weight.dtype)
    weight = weight / scale
    return weight + 1e-4 * torch.eye(weight.shape[0], dtype=weight.dtype)


def aware_metric(src: SourceAttention, stats) -> LayerMetric:
    """Downstream-aware: key errors weighted by the queries that read them (attention-score error), value
    errors by what W_o passes on; dropped RoPE components replaced by their measured mean rotation and the
    shared RoPE key chosen by the score energy that a mean rotation cannot reproduce."""
    rotation = (stats.rotation_cos, stats.rotation_sin) if stats.rotation_cos is not None else None
    cov = stats.input_cov
    groups = src.group_of_head
    d = src.head_dim
    key_weight = [torch.zeros(d, d, dtype=cov.dtype) for _ in range(src.num_kv_heads)]
    value_weight = [torch.zeros(d, d, dtype=cov.dtype) for _ in range(src.num_kv_heads)]
    for h in range(src.num_heads):
        rows, bias = nope_query(src, h, rotation)
        rows, moment = with_bias(rows, bias, cov, stats.input_mean)  # E[q q^T] of the biased query
        key_weight[groups[h]] += rows @ moment @ rows.T
        out_cols = src.wo[:, src.q_rows(h)]
        value_weight[groups[h]] += out_cols.T @ out_cols
    return LayerMetric(
        input_cov=cov,
        input_mean=stats.input_mean,
        rotation=rotation,
        key_out_weight=[_normalised(w) for w in key_weight],
        value_out_weight=[_normalised(w) for w in value_weight],
        balance=True,
    )


INIT_METHODS["aware"] = InitMethod(
    "aware",
    aware_metric,
    needs_calibration=True,
    help="query/output-weighted errors, mean-rotation RoPE removal (calibration)",
)
