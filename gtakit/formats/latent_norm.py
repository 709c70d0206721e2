"""The RMSNorm DeepSeek-V3 applies to the latent (`kv_a_layernorm`, in every engine, with no switch), met for a
gtakit MLA whose latent is not normalised.

DeepSeek's key/value of token t are `W_b (c_t / rms(c_t))`; gtakit's are `W_up c_t`: they differ by the per-token
factor 1/rms(c_t). Two ways to meet it, both fitted on the converted model's own latents over calibration text:

* refit (portable): the latent rows are scaled to a mean square of 1 (so each engine's eps is negligible), and
  `W_b` is the least-squares map from normalised latents to gtakit's keys and values (including constant value
  offsets). No biases, so vLLM and llama.cpp compute the same thing; the error is measured, not zero. Query and
  RoPE-key biases (Qwen2) have no slot there either and are absorbed by least squares on the attention input.
* anchor (exact, transformers only): one extra latent coordinate with zero weight and a constant bias B far above
  any latent norm, so rms(c_t) ~= B / sqrt(c + 1) for every token; W_up times that constant is `W_b`. Relative
  error |c_t|^2 / (2 B^2). vLLM and llama.cpp silently drop biases, so this variant is for transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ANCHOR_MARGIN = 1e3  # B / (largest calibration latent norm): relative error below 1e-6
RIDGE = 1e-8  # relative ridge on normal equations (a latent direction calibration never excites)


@dataclass
class LatentMoments:
    """Per-layer sums over calibration tokens (float64)."""

    tokens: int = 0
    input_sum: torch.Tensor | None = None  # [D]
    input_moment: torch.Tensor | None = None  # [D, D] sum x x^T (only when a bias must be absorbed)
    normed_moment: torch.Tensor | None = None  # [c, c] sum n n^T, n = c' / rms(c')
    latent_normed: torch.Tensor | None = None  # [c, c] sum c n^T (c: gtakit's latent, bias included)
    normed_sum: torch.Tensor | None = None  # [c]
    mean_square_sum: float = 0.0  # sum of ms(c')
    rms_values: list[float] = field(default_factory=list)  # a sample of rms(c') for the spread
    max_latent_norm: float = 0.0  # of gtakit's latent
    max_input_norm: float = 0.0

    def add_inputs(self, x: torch.Tensor) -> None:
        self.input_sum = _acc(self.input_sum, x.sum(0))
        self.input_moment = _acc(self.input_moment, x.T @ x)

    def add_latents(self, x: torch.Tensor, latent: torch.Tensor, absorbed_down: torch.Tensor | None) -> None:
        fitted = latent if absorbed_down is None else x @ absorbed_down.T  # c' (what the export computes)
        mean_square = fitted.pow(2).mean(-1)
        normed = fitted * mean_square.clamp(min=1e-30).rsqrt()[:, None]
        self.tokens += x.shape[0]
        self.normed_moment = _acc(self.normed_moment, normed.T @ normed)
        self.latent_normed = _acc(self.latent_normed, latent.T @ normed)
        self.normed_sum = _acc(self.normed_sum, normed.sum(0))
        self.mean_square_sum += float(mean_square.sum())
        self.rms_values += mean_square.sqrt()[:: max(1, x.shape[0] // 256)].tolist()
        self.max_latent_norm = max(self.max_latent_norm, float(latent.norm(dim=-1).max()))
        self.max_input_norm = max(self.max_input_norm, float(x.norm(dim=-1).max()))

    @property
    def rms_spread(self) -> float:
        """Coefficient of variation of rms(c'): 0 would make the norm a constant (and the refit exact)."""
        values = torch.tensor(self.rms_values, dtype=torch.float64)
        return float(values.std() / values.mean()) if len(values) > 1 else 0.0


def _acc(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.clone() if total is None else total + value


def _solve(moment: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """rhs @ (moment + ridge)^-1 for a symmetric PSD `moment`."""
    ridge = RIDGE * float(torch.trace(moment)) / moment.shape[0] + 1e-30
    eye = torch.eye(moment.shape[0], dtype=moment.dtype)
    return torch.linalg.solve(moment + ridge * eye, rhs.T).T


def absorb_bias(weight: torch.Tensor, bias: torch.Tensor | None, moments: LatentMoments) -> torch.Tensor:
    """W' minimising E|W'x - (Wx + b)|^2 over calibration inputs: W + b E[x]^T E[x x^T]^-1."""
    if bias is None or not bool(bias.any()):
        return weight
    n = moments.tokens or 1
    mean = moments.input_sum / n
    return weight + _solve(moments.input_moment / n, bias[:, None] * mean[None, :])


def latent_scale(moments: LatentMoments) -> float:
    """The factor that brings the fitted latent's mean square to 1."""
    return (moments.mean_square_sum / max(moments.tokens, 1)) ** -0.5 if moments.mean_square_sum > 0 else 1.0


def refit_up(up: torch.Tensor, offset: torch.Tensor | None, moments: LatentMoments) -> torch.Tensor:
    """`W_b` [rows, c] minimising sum_t |W_b n_t - (up c_t + offset)|^2, n_t the normalised latent."""
    rhs = up @ moments.latent_normed
    if offset is not None:
        rhs = rhs + offset[:, None] * moments.normed_sum[None, :]
    return _solve(moments.normed_moment, rhs)


def anchor_bias(moments: LatentMoments) -> float:
    return ANCHOR_MARGIN * max(moments.max_latent_norm, 1e-3)


def anchored_input_bias(moments: LatentMoments) -> float:
    return ANCHOR_MARGIN * max(moments.max_input_norm, 1e-3)
