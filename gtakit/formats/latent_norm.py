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

import math
from dataclasses import dataclass, field

import torch

ANCHOR_MARGIN = 1e3  # B / (largest calibration latent norm): relative error below 1e-6
RIDGE = 1e-8  # relative ridge on normal equations (a latent direction calibration never excites)
# Weights of the ballast coordinate relative to the latent's typical norm; each layer keeps the one whose refit
# leaves the least key/value error (0: no ballast, the plain refit).
BALLAST_WEIGHTS = (0.0, 1.0, 4.0, 16.0)


@dataclass
class LatentMoments:
    """Per-layer sums over calibration tokens (float64). Pass 1 (`add_inputs`): the attention input's moments,
    for bias absorption and the ballast direction; pass 2 (`add_latents`): the normalised latents' moments."""

    tokens: float = 0.0  # weighted count
    input_tokens: int = 0
    input_sum: torch.Tensor | None = None  # [D]
    input_moment: torch.Tensor | None = None  # [D, D] sum x x^T
    latent_square_sum: float = 0.0  # sum |c|^2 (pass 1)
    ballast: torch.Tensor | None = None  # [D] u with E[u x] = 1 and the least relative spread of u x
    latent_moment: torch.Tensor | None = None  # [c, c] sum c c^T (c: gtakit's latent, bias included)
    latent_sum: torch.Tensor | None = None  # [c]
    # per ballast weight: sums over tokens of n n^T, c n^T, n and ms(z), z = [c'; w R u x], n = z / rms(z)
    normed_moment: dict = field(default_factory=dict)
    latent_normed: dict = field(default_factory=dict)
    normed_sum: dict = field(default_factory=dict)
    mean_square_sum: dict = field(default_factory=dict)
    rms_values: list[float] = field(default_factory=list)  # a sample of rms(c') for the spread
    max_latent_norm: float = 0.0  # of gtakit's latent
    max_input_norm: float = 0.0

    def add_inputs(self, x: torch.Tensor, latent: torch.Tensor) -> None:
        self.input_tokens += x.shape[0]
        self.input_sum = _acc(self.input_sum, x.sum(0))
        self.input_moment = _acc(self.input_moment, x.T @ x)
        self.latent_square_sum += float(latent.pow(2).sum())

    def finish_inputs(self) -> None:
        """The ballast direction: u minimising Var(u x) / E[u x]^2 is C^-1 m (C the covariance, m the mean)."""
        n = max(self.input_tokens, 1)
        mean = self.input_sum / n
        cov = self.input_moment / n - torch.outer(mean, mean)
        u = _solve(cov, mean[None, :])[0]
        self.ballast = u / float(u @ mean)

    @property
    def latent_scale(self) -> float:
        """R: the latent's typical norm (the unit of the ballast weights)."""
        return (self.latent_square_sum / max(self.input_tokens, 1)) ** 0.5 or 1.0

    def add_latents(self, x: torch.Tensor, latent: torch.Tensor, absorbed_down: torch.Tensor | None) -> None:
        """One sequence's tokens. Its first token (the attention sink most heads attend to, whose hidden state is
        unlike any other) counts as much as a quarter of the sequence in the fits."""
        fitted = latent if absorbed_down is None else x @ absorbed_down.T  # c' (what the export computes)
        weight_of = torch.ones(x.shape[0], 1, dtype=x.dtype)
        weight_of[0] = max(1.0, x.shape[0] / 4)
        self.tokens += float(weight_of.sum())
        self.latent_moment = _acc(self.latent_moment, (weight_of * latent).T @ latent)
        self.latent_sum = _acc(self.latent_sum, (weight_of * latent).sum(0))
        weights = BALLAST_WEIGHTS if self.ballast is not None else (0.0,)
        extra = x @ self.ballast if self.ballast is not None else torch.zeros_like(fitted[:, 0])
        for weight in weights:
            z = torch.cat([fitted, (weight * self.latent_scale * extra)[:, None]], dim=1)
            mean_square = z.pow(2).mean(-1)
            normed = z * mean_square.clamp(min=1e-30).rsqrt()[:, None]
            weighted = weight_of * normed
            self.normed_moment[weight] = _acc(self.normed_moment.get(weight), weighted.T @ normed)
            self.latent_normed[weight] = _acc(self.latent_normed.get(weight), latent.T @ weighted)
            self.normed_sum[weight] = _acc(self.normed_sum.get(weight), weighted.sum(0))
            self.mean_square_sum[weight] = self.mean_square_sum.get(weight, 0.0) + float(
                (weight_of[:, 0] * mean_square).sum())
        self.rms_values += fitted.pow(2).mean(-1).sqrt()[:: max(1, x.shape[0] // 256)].tolist()
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
    n = moments.input_tokens or 1
    mean = moments.input_sum / n
    return weight + _solve(moments.input_moment / n, bias[:, None] * mean[None, :])


@dataclass
class Refit:
    weight: float  # the ballast weight kept
    scale: float  # multiplies the latent rows (and the ballast row) so the normalised vector's input has ms ~1
    up: torch.Tensor  # [rows, c + 1]: kv_b_proj
    residual: float  # relative key/value error left on the calibration tokens


def refit(up: torch.Tensor, offset: torch.Tensor | None, moments: LatentMoments) -> Refit:
    """For each ballast weight, `W_b` minimising sum_t |W_b n_t - (up c_t + offset)|^2; the best one."""
    best = None
    for weight in moments.normed_moment:
        rhs = up @ moments.latent_normed[weight]
        if offset is not None:
            rhs = rhs + offset[:, None] * moments.normed_sum[weight][None, :]
        solution = _solve(moments.normed_moment[weight], rhs)
        residual = _relative_residual(up, offset, moments, solution, rhs)
        if best is None or residual < best.residual:
            scale = (moments.mean_square_sum[weight] / max(moments.tokens, 1)) ** -0.5
            best = Refit(weight, scale, solution, residual)
    return best


def _relative_residual(up, offset, moments: LatentMoments, solution, rhs) -> float:
    """sum |t - W n|^2 / sum |t|^2 from the moments (t = up c + offset, W the least-squares solution)."""
    target = torch.trace(up @ moments.latent_moment @ up.T)
    if offset is not None:
        target = target + 2 * float(offset @ (up @ moments.latent_sum)) + moments.tokens * float(offset @ offset)
    explained = torch.trace(solution @ rhs.T)
    return float((target - explained) / target) if target > 0 else 0.0


def anchor_bias(moments: LatentMoments) -> float:
    return _power_of_two(ANCHOR_MARGIN * max(moments.max_latent_norm, 1e-3))


def anchored_input_bias(moments: LatentMoments) -> float:
    return _power_of_two(ANCHOR_MARGIN * max(moments.max_input_norm, 1e-3))


def _power_of_two(value: float) -> float:
    """The next power of two: stored exactly in bf16/fp16, so the folded 1/B matches the bias the engine reads."""
    return float(2.0 ** math.ceil(math.log2(value)))
