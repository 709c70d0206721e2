"""Refinement of converted layers against their source on the calibration text.

After a layer's closed-form conversion, its converted attention is run on the very inputs the source attention
receives (`LayerwiseCalibrator.attention_pairs`) and:

* `--refit output`: `o_proj` is refitted by least squares so that the converted attention's output matches the
  source attention's output, with the converted layer's own attention weights (the value path is linear in
  `o_proj`). The fit is pulled towards the converted `o_proj` by a small ridge, so a lossless conversion (whose
  output already matches) keeps its `o_proj` exactly.
* `--refine-steps N`: before the refit, a short optimisation (Adam, full batch) of all the converted attention's
  parameters on (source attention input, source attention output) pairs of `--refine-tokens` calibration tokens,
  minimising the relative squared output error. Deterministic (no sampling), so a rerun gives the same weights.
* `--sequential`: the hidden states passed on to the next layer come from the converted attention, so every later
  layer is calibrated (and refitted) on what the converted model computes (error feedback, as in GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch

from gtakit.errors import GtakitError
from gtakit.forms.base import ConvertedLayer, TensorNames
from gtakit.models import attention_class

if TYPE_CHECKING:
    from .calibration import CalibrationLayer

REFITS = ("auto", "none", "output")
RIDGE = 1e-4  # relative to the mean eigenvalue of the input moment; pulls the fit towards the converted o_proj
# `--refit-ridge auto`: per layer, the ridge of this grid with the least error on held-out calibration tokens. A
# fixed small ridge suits SmolLM2 (1e-4 to 1e-2 within 0.3%) but not Qwen2.5, whose attention outputs have a few
# massive directions: the mean eigenvalue is then far above the bulk's, 1e-4 of it leaves the rarely excited
# directions free, and the refit blew up o_proj 5-20x (KL to the source 11.9 nats at 50% MLA; 1.1 with 0.1).
# The held-out tokens are whole calibration sequences (every 4th; every 2nd when there are fewer than 4): text the
# fit has not seen. Interleaved blocks of the same sequences chose 1e-4 for Qwen2.5's layer 0, whose outputs
# depend on token identity; a held-out sequence showed that ridge's error at 2.6 against 0.28 for 0.1.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FALLBACK_RIDGE = 0.1  # a single calibration sequence: nothing to hold out (measured best fixed ridge on Qwen2.5)


@dataclass(frozen=True)
class Holdout:
    """Which calibration tokens validate the ridge: sequence k (of `seq_len` tokens) when k % every == every - 1."""

    seq_len: int
    every: int

    @staticmethod
    def for_sequences(sequences: int, seq_len: int) -> "Holdout | None":
        if sequences < 2:
            return None
        return Holdout(seq_len, 4 if sequences >= 4 else 2)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions // self.seq_len) % self.every == self.every - 1


def resolve_ridge(value: float | str) -> float | None:
    """A positive ridge, or None for `auto` (chosen per layer on held-out tokens)."""
    if isinstance(value, str) and value.strip() == "auto":
        return None
    try:
        ridge = float(value)
    except (TypeError, ValueError):
        raise GtakitError(f"--refit-ridge must be 'auto' or a number > 0, got {value!r}") from None
    if not ridge > 0 or ridge == float("inf"):  # rank-deficient least squares (values narrower than o_proj)
        raise GtakitError(f"--refit-ridge must be 'auto' or a finite number > 0, got {value!r}")
    return ridge


def resolve_refit(refit: str, calibrated: bool) -> str:
    """`auto`: the output refit when calibration text is given (measured: benchmarks/RESULTS.md), else none."""
    if refit not in REFITS:
        raise GtakitError(f"--refit must be one of {', '.join(REFITS)}, got {refit!r}")
    if refit == "auto":
        return "output" if calibrated else "none"
    if refit != "none" and not calibrated:
        raise GtakitError(f"--refit {refit} fits the converted layers on calibration text: pass --calib FILE")
    return refit


def build_attention(source_config: Any, spec: dict, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model-side attention of one converted layer (float32, PyTorch paths) holding `tensors`."""
    module = attention_class(spec["form"])(source_config, dict(spec), index, "torch")
    module.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)
    return module.eval()


@dataclass
class OutputMoments:
    """Sums over calibration tokens of u u^T, y u^T and |y|^2: u the converted attention's `o_proj` input, y the
    source attention's output (minus the `o_proj` bias)."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_energy: float
    tokens: int = 0  # calibration tokens summed (recorded in the conversion report)
    held_out: "OutputMoments | None" = None  # the part of these sums from the held-out blocks

    def without(self, part: "OutputMoments") -> "OutputMoments":
        return OutputMoments(self.gram - part.gram, self.cross - part.cross, self.target_energy - part.target_energy,
                             self.tokens - part.tokens)

    def error(self, weight: torch.Tensor) -> float:
        """Relative squared error |W u - y|^2 / |y|^2 summed over the tokens."""
        w = weight.double()
        value = torch.trace(w @ self.gram @ w.T) - 2 * torch.trace(w @ self.cross.T) + self.target_energy
        return float(value.clamp(min=0.0)) / max(self.target_energy, 1e-30)


@torch.no_grad()
def output_moments(module: torch.nn.Module, pairs: Iterable[tuple[tuple, dict, torch.Tensor]],
                   tokens: int = 0, holdout: Holdout | None = None) -> OutputMoments:
    """Run `module` on the (args, kwargs, source output) of `pairs` and accumulate the moments of the fit: on all of
    them, or (`tokens` > 0) on exactly the first `tokens` calibration tokens (row by row, as the text runs), so the
    fit does not depend on the device's micro-batch size. The rest of `pairs` is still consumed: a pass that
    advances the calibrator must run to its end. `holdout`: also the sums over those tokens (`held_out`)."""
    o_proj = module.o_proj
    captured: list[torch.Tensor] = []
    handle = o_proj.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    total = _empty_moments(o_proj)
    held = _empty_moments(o_proj) if holdout is not None else None  # n^2 float64: only when a ridge is chosen
    seen = 0
    try:
        for args, kwargs, target in pairs:
            if tokens and seen >= tokens:
                continue
            module(*args, **kwargs)
            u = captured.pop().reshape(-1, o_proj.in_features).float()
            y = target.reshape(-1, o_proj.out_features).float()
            if tokens and seen + len(u) > tokens:  # the batch runs whole (its masks span it); only N tokens count
                u, y = u[: tokens - seen], y[: tokens - seen]
            if o_proj.bias is not None:
                y = y - o_proj.bias
            position = seen + torch.arange(len(u), device=u.device)  # calibration token index, as the text runs
            seen += len(u)
            _accumulate(total, u, y)
            if held is not None:
                chosen = holdout.mask(position)
                _accumulate(held, u[chosen], y[chosen])
    finally:
        handle.remove()
    total.held_out = held
    return total


def _empty_moments(o_proj: torch.nn.Linear) -> OutputMoments:
    return OutputMoments(torch.zeros(o_proj.in_features, o_proj.in_features, dtype=torch.float64),
                         torch.zeros(o_proj.out_features, o_proj.in_features, dtype=torch.float64), 0.0)


def _accumulate(moments: OutputMoments, u: torch.Tensor, y: torch.Tensor) -> None:
    # fp32 GEMMs per micro-batch, summed in float64 (as the calibration moments are)
    moments.gram += (u.T @ u).double().cpu()
    moments.cross += (y.T @ u).double().cpu()
    moments.target_energy += float((y.double() ** 2).sum())
    moments.tokens += len(u)


def choose_ridge(moments: OutputMoments, weight: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """The ridge of `grid` whose refit on the other sequences has the least error on the held-out ones (the smallest
    on a tie); `FALLBACK_RIDGE` when nothing was held out."""
    held = moments.held_out
    if held is None or held.tokens == 0 or held.target_energy <= 0 or held.tokens == moments.tokens:
        return FALLBACK_RIDGE
    rest = moments.without(held)
    errors = [held.error(refit_output_weight(rest, weight, ridge)) for ridge in grid]
    return grid[min(range(len(grid)), key=lambda k: (errors[k], k))]


def refitted_weight(moments: OutputMoments, weight: torch.Tensor, ridge: float | None) -> tuple[torch.Tensor, float]:
    """The refitted o_proj and its ridge: `ridge`, or (None) the one `choose_ridge` picks."""
    ridge = ridge if ridge is not None else choose_ridge(moments, weight)
    return refit_output_weight(moments, weight, ridge), ridge


def refit_output_weight(moments: OutputMoments, weight: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """argmin_W |W u - y|^2 + lambda |W - W0|^2 over the calibration tokens (W0 = `weight`; lambda = `ridge` times
    the mean eigenvalue of the input moment)."""
    gram = moments.gram
    n = gram.shape[0]
    strength = ridge * float(torch.trace(gram)) / n
    if strength <= 0:  # nothing excited the input (or no ridge): keep the closed-form weight
        return weight.double()
    rhs = moments.cross + strength * weight.double()
    return torch.linalg.solve(gram + strength * torch.eye(n, dtype=gram.dtype), rhs.T).T


REFINE_LR = 1e-4  # Adam step on the converted attention's weights (measured: benchmarks/RESULTS.md)


def fixed_pairs(pairs: Iterable[tuple[tuple, dict, torch.Tensor]], tokens: int) -> list[tuple[tuple, dict, torch.Tensor]]:
    """The first micro-batches of `pairs` holding at least `tokens` tokens, kept for repeated passes."""
    kept, seen = [], 0
    for args, kwargs, target in pairs:
        kept.append((args, kwargs, target))
        seen += target.shape[0] * target.shape[1]
        if seen >= tokens:
            break
    return kept


def fit_locally(module: torch.nn.Module, pairs: list[tuple[tuple, dict, torch.Tensor]], steps: int,
                lr: float = REFINE_LR) -> list[float]:
    """`steps` Adam steps on the relative squared error of `module`'s output over all `pairs`; returns the loss
    before each step."""
    params = [p for p in module.parameters() if p.numel()]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    energy = sum(float((target.double() ** 2).sum()) for _, _, target in pairs)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for args, kwargs, target in pairs:
                out = module(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = ((out - target) ** 2).sum() / energy
                loss.backward()
                total += float(loss.detach())
            losses.append(total)
            optimizer.step()
    for param in params:
        param.requires_grad_(False)
    return losses


def refit_holdout(layer: "CalibrationLayer", refit_tokens: int = 0) -> Holdout | None:
    """The held-out sequences of the calibration text that the refit's tokens span."""
    sequences, seq_len = layer.sequences
    if refit_tokens:
        sequences = min(sequences, -(-refit_tokens // seq_len))
    return Holdout.for_sequences(sequences, seq_len)


class LayerRefiner:
    """Refines each converted layer right after its conversion, on the calibration inputs of that layer."""

    def __init__(self, source_config: Any, refit: str, sequential: bool, steps: int = 0, tokens: int = 0,
                 refit_tokens: int = 0, ridge: float | None = None) -> None:
        self.source_config = source_config
        self.refit = refit
        self.sequential = sequential
        self.steps = steps
        self.tokens = tokens
        self.refit_tokens = refit_tokens
        self.ridge = ridge

    @property
    def active(self) -> bool:
        return self.refit != "none" or self.sequential or self.steps > 0

    def __call__(self, layer: "CalibrationLayer", spec: dict, converted: ConvertedLayer) -> ConvertedLayer:
        module = build_attention(self.source_config, spec, layer.index, converted.tensors).to(layer.device)
        if self.steps:
            self.fit(module, layer, converted)
        if self.refit == "output":
            self.refit_output(module, layer, converted)
        if self.sequential:
            layer.next_layer_through(module)
        return converted

    def fit(self, module: torch.nn.Module, layer: "CalibrationLayer", converted: ConvertedLayer) -> None:
        """Layer-local fitting: Adam steps on the layer's source attention inputs and outputs."""
        losses = fit_locally(module, fixed_pairs(layer.attention_pairs(), self.tokens), self.steps)
        state = module.state_dict()
        for name, tensor in converted.tensors.items():
            converted.tensors[name] = state[name].detach().to(device="cpu", dtype=tensor.dtype)
        converted.metrics["refine_loss_first"], converted.metrics["refine_loss_last"] = losses[0], losses[-1]

    def refit_output(self, module: torch.nn.Module, layer: "CalibrationLayer", converted: ConvertedLayer) -> None:
        """o_proj refitted by least squares to the source attention's output on the calibration inputs."""
        holdout = refit_holdout(layer, self.refit_tokens) if self.ridge is None else None
        # Without sequential calibration the same pass moves the calibration on to the next layer.
        pairs = layer.attention_pairs() if self.sequential else layer.pairs_then_next_layer()
        moments = output_moments(module, pairs, self.refit_tokens, holdout)
        o_name = TensorNames(module).o_proj.weight
        before = moments.error(module.o_proj.weight.detach())
        weight, converted.metrics["refit_ridge"] = refitted_weight(moments, converted.tensors[o_name], self.ridge)
        converted.tensors[o_name] = weight.to(converted.tensors[o_name].dtype)
        module.o_proj.weight.data.copy_(weight.float())
        converted.metrics["output_rel_error_before_refit"] = before
        converted.metrics["output_rel_error"] = moments.error(weight)
        converted.metrics["refit_tokens"] = moments.tokens


__all__ = ["REFITS", "RIDGE", "RIDGE_GRID", "Holdout", "LayerRefiner", "build_attention", "choose_ridge",
           "fit_locally", "fixed_pairs", "output_moments", "refit_holdout", "refit_output_weight", "refitted_weight",
           "resolve_refit", "resolve_ridge"]
