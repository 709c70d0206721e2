"""Linear algebra the form converters share (float64): error metrics, PSD roots, top bases, bias folding.

The error metric is pluggable (see `methods.py`): a `LayerMetric` gives the input second moment used to
measure key/value errors (identity = weights only) and optional extra weights on key and value errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtakit.families.base import SourceAttention


@dataclass
class LayerMetric:
    """How errors are measured when compressing one layer.

    input_cov: E[x x^T] of the layer input [D, D]; None means identity (weight-only SVD).
    key_out_weight: per KV head [d, d] PSD weight on no-RoPE key errors (e.g. E[q q^T] of the heads reading it).
    value_out_weight: per KV head [d, d] PSD weight on value errors (e.g. W_o^T W_o of the heads reading it).
    balance: scale keys so key and value blocks carry equal energy before the joint decomposition.
    """

    input_cov: torch.Tensor | None = None
    input_mean: torch.Tensor | None = None  # E[x] [D]: with q/k biases (None: zero)
    query_cov: torch.Tensor | None = None  # [H, d] mean squared query per dim, for the RoPE ranking
    key_out_weight: list[torch.Tensor] | None = None
    value_out_weight: list[torch.Tensor] | None = None
    balance: bool = True
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # [H, d/2] mean cos/sin per head and frequency

    def ranking_rotation(self, credit: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mean rotation as the shared RoPE key's ranking credits it (`select_shared_rope` discounts each
        component's energy by 1 - |M|^2; scaling M by sqrt(credit) credits that share of it). None: plain energy.
        `credit` is the share of the mean rotation trusted (--rope-rotation-credit).

        The rotation is measured over calibration attention, mostly a few hundred tokens: full credit drops the
        slow, strong components that retrieval heads match at thousands of tokens (SmolLM2 MLA 50%: passkey at 4k
        40% with full credit, 100% with half, for 0.4% of short-window perplexity)."""
        if self.rotation is None or credit == 0:
            return None
        scale = credit**0.5
        return self.rotation[0] * scale, self.rotation[1] * scale


def with_bias(rows: torch.Tensor, bias: torch.Tensor | None, cov: torch.Tensor | None,
              mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows and input moment of the affine map `rows @ x + bias` as a linear map of [x; 1]: energies measured
    with them count the bias (Qwen2's key biases reach 145 against key rows of norm 7; without them the shared
    RoPE key's ranking misses the components that carry the bias's position signal). No bias: unchanged."""
    if bias is None:
        return rows, cov
    rows = torch.cat([rows, bias.reshape(*rows.shape[:-1], 1).to(rows.dtype)], dim=-1)
    if cov is None:
        return rows, None  # identity on [x; 1]
    size = cov.shape[0]
    mean = mean.to(cov.dtype) if mean is not None else cov.new_zeros(size)
    augmented = cov.new_zeros(size + 1, size + 1)
    augmented[:size, :size] = cov
    augmented[:size, size] = augmented[size, :size] = mean
    augmented[size, size] = 1.0
    return rows, augmented


def moment(rows: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    return rows @ rows.T if cov is None else rows @ cov @ rows.T


def sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def rel_err(resid: torch.Tensor, ref: torch.Tensor, cov: torch.Tensor | None) -> float:
    den = float(torch.trace(moment(ref, cov)))
    return float(torch.trace(moment(resid, cov)).clamp(min=0).sqrt() / max(den, 1e-300) ** 0.5) if den > 0 else 0.0


def top_basis(second_moment: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal [n, rank] basis of the top eigenvectors of a PSD moment (zero columns past its size)."""
    evals, evecs = torch.linalg.eigh(second_moment)
    order = torch.argsort(evals, descending=True)[:rank]
    basis = evecs[:, order]
    if basis.shape[1] < rank:
        basis = torch.cat([basis, basis.new_zeros(basis.shape[0], rank - basis.shape[1])], dim=1)
    return basis


def svd_full(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD with a full orthogonal Vh; falls back to the eigendecomposition of M^T M when LAPACK's SVD fails
    to converge on an ill-conditioned M (seen on real checkpoints)."""
    try:
        return torch.linalg.svd(mat, full_matrices=True)
    except torch.linalg.LinAlgError:
        evals, evecs = torch.linalg.eigh(mat.T @ mat)
        order = torch.argsort(evals, descending=True)
        evecs = evecs[:, order]
        k = min(mat.shape)
        sing = evals[order][:k].clamp(min=0).sqrt()
        left = mat @ evecs[:, :k]
        safe = torch.where(sing > sing.max() * 1e-12, sing, torch.ones_like(sing))
        left = torch.where(sing > sing.max() * 1e-12, left / safe, torch.zeros_like(left))
        return left, sing, evecs.T


def fold_value_bias(src: SourceAttention) -> torch.Tensor | None:
    """A value bias passes through softmax unchanged (weights sum to 1), so it folds into o_proj's bias."""
    if src.bv is None and src.bo is None:
        return None
    bias = src.bo.clone() if src.bo is not None else src.wo.new_zeros(src.wo.shape[0])
    if src.bv is not None:
        groups = src.group_of_head
        for h in range(src.num_heads):
            bias += src.wo[:, src.q_rows(h)] @ src.bv[src.kv_rows(groups[h])]
    return bias


def weighted_rows(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return rows if weight is None else sqrt_psd(weight) @ rows
