"""Unit checks of the conversion linear algebra."""

from __future__ import annotations

import pytest
import torch

from gtakit.forms import linalg
from gtakit.families.base import SourceAttention
from gtakit.forms.rope import nope_query, select_shared_rope


def _source(heads=4, kv_heads=2, head_dim=8, hidden=32, seed=0) -> SourceAttention:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return SourceAttention(
        wq=rand(heads * head_dim, hidden), wk=rand(kv_heads * head_dim, hidden), wv=rand(kv_heads * head_dim, hidden),
        wo=rand(hidden, heads * head_dim), bq=None, bk=None, bv=None, bo=None, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, inv_freq=1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim)),
    )


def test_keeping_every_component_leaves_no_residual_key():
    src = _source()
    rope = select_shared_rope(src, num_pairs=src.num_kv_heads * src.head_dim // 2)
    assert rope.score_energy_kept == pytest.approx(1.0)
    assert all(r.abs().max() < 1e-10 for r in rope.residual_key)


def test_kept_plus_residual_reconstructs_each_key_head():
    """Mixing is orthogonal per frequency: head g's key = sum over components of U[m, g] * component."""
    src = _source()
    rope = select_shared_rope(src, num_pairs=3)
    half, G = src.head_dim // 2, src.num_kv_heads
    for g in range(G):
        rebuilt = rope.residual_key[g].clone()
        P = len(rope.kept)
        for j, (i, m) in enumerate(rope.kept):
            for c in range(2):
                rebuilt[i + c * half] += rope.mixing[i, m, g] * rope.key_rows[j + c * P]
        assert torch.allclose(rebuilt, src.wk[src.kv_rows(g)], atol=1e-10)


def test_mean_rotation_of_zero_distance_is_identity():
    src = _source()
    cos = torch.ones(src.num_heads, src.head_dim // 2, dtype=torch.float64)
    rows, _ = nope_query(src, 1, (cos, torch.zeros_like(cos)))
    assert torch.equal(rows, src.wq[src.q_rows(1)])


def test_svd_fallback_when_lapack_fails(monkeypatch):
    mat = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    left, sing, vh = linalg.svd_full(mat)
    assert vh.shape == (6, 6) and torch.allclose(vh @ vh.T, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(left @ torch.diag(sing) @ vh[:3], mat, atol=1e-10)


def test_rotation_credit_keeps_a_strong_slow_component_that_full_credit_drops():
    """A slow frequency barely rotates over the calibration's (mostly short) attention distances: with full credit
    for its mean rotation it is worthless to the shared RoPE key, ranked by score energy it is the strongest, and
    half credit (the default) still keeps it. Long-range retrieval needs it (issue 31)."""
    src = _source()
    half = src.head_dim // 2
    for tensor in (src.wk, src.wq):  # the slowest frequency (index half - 1) carries most of the score energy
        rows = tensor.view(-1, 2, half, tensor.shape[-1])
        rows[:, :, half - 1] *= 10
    cos = torch.zeros(src.num_heads, half, dtype=torch.float64)
    cos[:, half - 1] = 1.0  # it never rotates within the measured distances
    rotation = (cos, torch.zeros_like(cos))

    def kept(credit: float) -> list[tuple[int, int]]:
        metric = linalg.LayerMetric(rotation=rotation)
        return select_shared_rope(src, 2, rotation=metric.ranking_rotation(credit)).kept

    assert linalg.LayerMetric(rotation=rotation).ranking_rotation(0.0) is None
    assert all(i == half - 1 for i, _ in kept(0.0))
    assert all(i == half - 1 for i, _ in kept(0.5))
    assert all(i != half - 1 for i, _ in kept(1.0))


@pytest.mark.parametrize("with_stats", [False, True])
def test_a_large_key_bias_makes_its_frequency_part_of_the_shared_rope_key(with_stats):
    """Qwen2's key biases reach 145 against key rows of norm 7: the bias rotates with the key's position, so the
    frequency that carries it must stay rotary, weights-only energy or not."""
    src = _source()
    half = src.head_dim // 2
    src.bk = torch.zeros(src.num_kv_heads * src.head_dim, dtype=torch.float64)
    src.bq = torch.zeros(src.num_heads * src.head_dim, dtype=torch.float64)
    src.bk[half - 1] = src.bk[2 * half - 1] = 100.0  # head 0, the slowest frequency, both coordinates
    cov, mean = (torch.eye(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)) if with_stats else (None, None)
    unbiased = select_shared_rope(_source(), num_pairs=2, input_cov=cov, input_mean=mean)
    biased = select_shared_rope(src, num_pairs=2, input_cov=cov, input_mean=mean)
    assert half - 1 not in unbiased.index and half - 1 in biased.index
    assert biased.key_bias.abs().max() == pytest.approx(100.0)  # the kept component carries the bias


def test_with_bias_is_the_moment_of_the_affine_map():
    g = torch.Generator().manual_seed(1)
    rows, bias = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(1000, 5, generator=g, dtype=torch.float64) + 0.5
    cov, mean = x.T @ x / len(x), x.mean(0)
    augmented, moment = linalg.with_bias(rows, bias, cov, mean)
    y = x @ rows.T + bias
    assert torch.allclose(augmented @ moment @ augmented.T, y.T @ y / len(x))
    assert linalg.with_bias(rows, None, cov, mean) == (rows, cov)
