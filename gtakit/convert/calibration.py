"""Calibration: stream text through the source model one decoder layer at a time, keeping only the second
moment of each attention input (E[x x^T] after the input norm).

Every statistic the initialisation methods need (key covariances per RoPE frequency, query energies, value
covariances) is a quadratic form of that moment with the layer's weights, so nothing else is stored. Only one
layer's weights and the running hidden states are in memory; statistics are produced lazily in layer order so
conversion can consume layer i before layer i + 1 is computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError
from gtakit.families import FamilyAdapter, family_of
from gtakit.io.source import SourceModel

# Tokens per forward micro-batch. On the CPU the tensors of a 2048-token batch stay under glibc's mmap
# threshold and are reused instead of being mapped and page-faulted in again for every batch: half the page
# faults and kernel time of 8192-token batches (which spent ~12% of the CPU time in the kernel), at least as
# fast. A GPU wants large batches.
MICRO_BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}


ROTATION_SAMPLE_ROWS = 1  # sequences on which attention distances are measured
ATTENTION_SAMPLE_TOKENS = 512  # GHLA conversion: attention maps are compared on this many tokens of one sequence


@dataclass
class LayerStats:
    input_cov: torch.Tensor  # [D, D] float64, E[x x^T] of the attention input
    tokens: int
    # E[x] of the attention input [D] float64: with q/k biases, the score energy has cross terms with the mean
    input_mean: torch.Tensor | None = None
    # Attention-weighted E[cos(dt * theta_i)] and E[sin(dt * theta_i)] per query head and source RoPE
    # frequency ([H, d/2]), dt = query position - key position: the rotation a component would see on average.
    rotation_cos: torch.Tensor | None = None
    rotation_sin: torch.Tensor | None = None
    # Normalised attention input of the first calibration sequence's first tokens [L, D] (float32), on which
    # GHLA conversion measures attention maps; tiny next to the input moment.
    attention_sample: torch.Tensor | None = None
    # QK-norm sources: mean per-token 1/rms of the queries per head and of the keys per KV head (`[1]` each when
    # the norm spans all heads), which conversion folds into the weights.
    query_scale_mean: torch.Tensor | None = None
    key_scale_mean: torch.Tensor | None = None


def attention_rotation_moments(
    family: FamilyAdapter, layer: torch.nn.Module, x: torch.Tensor, cos_sin, config, inv_freq: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Measure, on normalised inputs `x` [B, L, D], the attention-weighted mean rotation of every frequency."""
    batch, length, _ = x.shape
    q, k = family.rotated_queries_keys(layer, x, cos_sin, config)
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    positions = torch.arange(length, device=x.device, dtype=torch.float64)
    angles = positions[:, None] * inv_freq.double().to(x.device)[None, :]  # [L, d/2]
    cos, sin = angles.cos(), angles.sin()
    pairs = cos.shape[1]
    # mean over query i and key j of p_ij cos((i - j) theta) = mean_i [cos(i theta) sum_j p_ij cos(j theta) +
    # sin(i theta) sum_j p_ij sin(j theta)] (and the like for sin): the sums over j are an attention whose values
    # are the cos/sin tables, which SDPA's fused kernel computes without the L x L probabilities.
    table = torch.cat([cos, sin], dim=1).to(q.dtype).expand(batch, heads, length, 2 * pairs).contiguous()
    weighted = torch.nn.functional.scaled_dot_product_attention(
        q, k, table, attn_mask=mask, is_causal=mask is None, scale=family.attention_scale(config)).double()
    by_cos, by_sin = weighted[..., :pairs], weighted[..., pairs:]
    count = batch * length  # every query's probabilities sum to one
    mean_cos = (cos * by_cos + sin * by_sin).sum(dim=(0, 2)) / count
    mean_sin = (sin * by_cos - cos * by_sin).sum(dim=(0, 2)) / count
    return mean_cos.clamp(-1.0, 1.0), mean_sin.clamp(-1.0, 1.0)  # means of cosines; fp32 sums round past 1


def is_local_text(spec: str) -> bool:
    """A --calib value names a local file (rather than a datasets name)."""
    path = Path(spec).expanduser()
    return path.exists() or spec.startswith((".", "/", "~")) or path.suffix in (".txt", ".json", ".jsonl", ".md")


def load_calibration_text(spec: str, max_chars: int) -> str:
    """Text of a local file (plain or JSON lines), or of a `datasets` dataset `NAME[:CONFIG[:SPLIT]]`."""
    from gtakit.io.text import iter_dataset_texts, read_text

    path = Path(spec).expanduser()
    if is_local_text(spec):
        return read_text(path, option="--calib")
    texts, total = [], 0
    for text in iter_dataset_texts(spec, "text", option="--calib"):
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise GtakitError(f"dataset {spec!r} has no 'text' rows")
    return "\n\n".join(texts)


def calibration_ids(source: SourceModel, path: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """Token ids `[num_sequences, seq_len]` from a text file (plain or JSON lines) or a datasets name."""
    return text_ids(source.load_tokenizer(), path, num_tokens, seq_len)


def text_ids(tokenizer, path: str, num_tokens: int, seq_len: int) -> torch.Tensor:
    """`calibration_ids` with a given tokenizer."""
    if seq_len < 16:
        raise GtakitError(f"--calib-seq-len {seq_len} is too short; use at least 16 tokens")
    text = load_calibration_text(path, max_chars=num_tokens * 8)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:num_tokens]
    seq_len = min(seq_len, len(ids))
    rows = len(ids) // seq_len if seq_len else 0
    if rows * seq_len < 1024:
        raise GtakitError(f"{path} gives only {len(ids)} tokens; calibration needs at least 1024")
    return ids[: rows * seq_len].view(rows, seq_len)


class LayerwiseCalibrator:
    """Callable `layer_idx -> LayerStats`, to be called for layers 0, 1, 2, ... in order."""

    def __init__(
        self, source: SourceModel, ids: torch.Tensor, progress: bool = False, device: str | torch.device = "cpu",
        family: FamilyAdapter | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.source = source
        self.family = family = family or family_of(source.config)
        # Hidden states stay on the CPU; one layer and one micro-batch at a time visit the device.
        self.device = torch.device(device)
        config = source.config
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, attn_implementation=family.attention_implementation)
        self.layers = family.decoder_layers(skeleton)
        family_rotary = family.rotary(skeleton)  # None: the family has no RoPE (learned positions)
        rotary = type(family_rotary)(config=config).to(self.device) if family_rotary is not None else None
        self.config = config
        num_layers = config.num_hidden_layers
        self.inv_freq = [family.layer_inv_freq(config, index) for index in range(num_layers)]
        self.hidden = family.embed(ids, source.weights, config).float()  # [rows, seq, D]
        seq_len = ids.shape[1]
        # The same positions in every layer and row: one [1, seq, d] table per layer kind (shared between the
        # layers of a kind), broadcast over each micro-batch.
        position_ids = torch.arange(seq_len, device=self.device).unsqueeze(0)
        probe = self.hidden.new_empty(0, device=self.device)
        tables: dict = {}
        self.cos_sin = []
        for index in range(num_layers):
            kind = family.rope_kind(config, index)
            if kind not in tables:
                tables[kind] = family.position_embeddings(rotary, probe, position_ids, kind)
            self.cos_sin.append(tables[kind])
        self.next_layer = 0
        self.pending: tuple[int, torch.nn.Module] | None = None  # layer whose statistics were last taken
        self.replacement: torch.nn.Module | None = None  # its converted attention (sequential calibration)
        # The pending layer's output already replaced the hidden states (`attention_pairs(advance=True)`), or an
        # advancing pass is under way.
        self.advanced = self.advancing = False
        batch_tokens = MICRO_BATCH_TOKENS.get(self.device.type, MICRO_BATCH_TOKENS["cpu"])
        self.rows_per_batch = max(1, batch_tokens // seq_len)
        self.progress = tqdm(total=config.num_hidden_layers, desc="calibrating", disable=not progress)

    def _load_layer(self, index: int) -> torch.nn.Module:
        layer = self.layers[index]
        prefix = f"{self.family.layers_prefix}.{index}."
        state = {
            name: self.family.read(self.source.weights, self.config, prefix + name).to(self.device, torch.float32)
            for name in layer.state_dict()
        }
        layer.load_state_dict(state, assign=True)
        return layer.eval()

    def _micro_batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows on the calibration device) of each micro-batch of the hidden states."""
        for start in range(0, self.hidden.shape[0], self.rows_per_batch):
            yield start, self.hidden[start : start + self.rows_per_batch].to(self.device)

    @torch.no_grad()
    def _moments(self, layer: torch.nn.Module, chunk: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x^T x (fp32) of the rows `chunk` after the input norm, and the sums of x and, for QK-norm sources, of
        the query and key norm scalars (float64)."""
        normed = self.family.input_norm(layer)(chunk)
        # One fp32 GEMM per micro-batch (a sum of a few thousand non-negative-definite terms loses ~1e-6),
        # accumulated in float64 across micro-batches: the float64 GEMM cost a tenth of the whole pass.
        x = normed.reshape(-1, normed.shape[-1])
        scales = self.family.qk_norm_scales(layer, x, self.config)
        sums = [x.double().sum(dim=0)] + ([s.double().sum(dim=0) for s in scales] if scales is not None else [])
        return x.T @ x, sums

    def _layer_mask(self, index: int) -> torch.Tensor | None:
        mask = self.family.calibration_mask(self.config, index, self.hidden.shape[1], self.device)
        if mask is not None and self.family.attention_implementation == "eager":  # eager adds its mask
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return mask

    def _forward(self, layer: torch.nn.Module, index: int, chunk: torch.Tensor, mask: torch.Tensor | None):
        out = layer(chunk, attention_mask=mask, position_embeddings=self.cos_sin[index], use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def _advance(self) -> None:
        """Replace the hidden states by the output of the layer statistics were last taken for (through the
        attention given to `use_attention`, if any), then release that layer."""
        if self.pending is None:
            return
        index, layer = self.pending
        if self.advancing:
            raise RuntimeError(f"an advancing pass over layer {index}'s attention pairs stopped early: the hidden "
                               "states are half replaced")
        if index == len(self.layers) - 1:  # the last layer's output is never needed
            self.hidden = None
        elif not self.advanced:
            name = self.family.attention_name
            own = getattr(layer, name)
            if self.replacement is not None:
                setattr(layer, name, self.replacement)
            try:
                mask = self._layer_mask(index)
                for start, chunk in self._micro_batches():
                    out = self._forward(layer, index, chunk, mask)
                    self.hidden[start : start + chunk.shape[0]] = out.to(self.hidden.device)
            finally:
                setattr(layer, name, own)
        layer.to("meta")  # release this layer's weights
        self.pending, self.replacement, self.advanced = None, None, False

    def finish(self) -> None:
        """Release the last layer and the hidden states once conversion is done with them."""
        self._advance()

    def use_attention(self, index: int, attention: torch.nn.Module) -> None:
        """Sequential calibration: the hidden states passed on to layer `index + 1` come from `attention` (the
        converted one) instead of the source's, so later layers are calibrated on what the converted model
        computes."""
        self._check_pending(index)
        self.replacement = attention.to(self.device)

    def _check_pending(self, index: int) -> None:
        if self.pending is None or self.pending[0] != index:
            raise RuntimeError(f"layer {index} is not the layer being calibrated")
        if self.advanced or self.advancing:
            raise RuntimeError(f"layer {index}'s inputs were replaced by its outputs (attention_pairs(advance=True))")

    def attention_pairs(self, index: int, advance: bool = False) -> Iterator[tuple[tuple, dict, torch.Tensor]]:
        """For layer `index` (the one statistics were last taken for): per micro-batch, the arguments its attention
        receives inside the decoder layer (positional, keyword) and the source attention's output. A converted
        attention called with the same arguments is compared with the source's on exactly its inputs.

        `advance`: run the whole layer and keep its output as the next layer's input, the pass that advancing to
        the next layer would make (the layer then runs once for both). The pairs must be consumed to the end; no
        other pass over this layer may follow, and `use_attention` cannot apply to it."""
        self._check_pending(index)
        layer = self.pending[1]
        advance = advance and index < len(self.layers) - 1  # the last layer's output is never needed
        attention = getattr(layer, self.family.attention_name)
        captured: dict = {}

        def capture(module, args, kwargs, output):
            captured.update(args=args, kwargs=kwargs, output=output[0] if isinstance(output, tuple) else output)
            if not advance:
                raise _StopLayer  # the rest of the layer (its MLP) is not needed

        handle = attention.register_forward_hook(capture, with_kwargs=True)
        mask = self._layer_mask(index)
        self.advancing = advance
        try:
            for start, chunk in self._micro_batches():
                if advance:  # the attention's arguments may be views of the rows the output replaces (post-norm)
                    chunk = chunk.clone()
                try:
                    with torch.no_grad():
                        out = self._forward(layer, index, chunk, mask)
                    if advance:
                        self.hidden[start : start + chunk.shape[0]] = out.to(self.hidden.device)
                except _StopLayer:
                    pass
                yield captured["args"], captured["kwargs"], captured["output"]
                captured.clear()
            self.advanced, self.advancing = advance, False
        finally:
            handle.remove()

    def layer(self, index: int) -> CalibrationLayer:
        """Move on to layer `index` (the next one) and return it with its statistics."""
        return CalibrationLayer(index, self(index), self)

    @torch.no_grad()
    def __call__(self, index: int) -> LayerStats:
        if index != self.next_layer:
            raise RuntimeError(f"calibration is sequential: expected layer {self.next_layer}, got {index}")
        self._advance()
        layer = self._load_layer(index)
        self.pending = (index, layer)
        sample = self.family.input_norm(layer)(self.hidden[:ROTATION_SAMPLE_ROWS].to(self.device))
        attention_sample = sample[0, :ATTENTION_SAMPLE_TOKENS].float().cpu()
        # The family's own window (sliding-attention layers); None = plain causal.
        mask = self.family.calibration_mask(self.config, index, self.hidden.shape[1], self.device)
        if self.family.layer_has_rope(self.config, index):
            rotation = attention_rotation_moments(self.family, layer, sample, self.cos_sin[index], self.config,
                                                  self.inv_freq[index].to(self.device), mask)
        else:  # nothing rotates in this layer: the mean rotation is the identity
            pairs = self.family.head_dim(self.config) // 2
            heads = self.config.num_attention_heads
            rotation = (torch.ones(heads, pairs, dtype=torch.float64), torch.zeros(heads, pairs, dtype=torch.float64))
        dim = self.hidden.shape[-1]
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        sums = None
        for _, chunk in self._micro_batches():
            moment, chunk_sums = self._moments(layer, chunk)
            cov += moment.double()
            sums = chunk_sums if sums is None else [a + b for a, b in zip(sums, chunk_sums)]
        input_sum, scale_sums = sums[0], sums[1:]
        count = self.hidden.shape[0] * self.hidden.shape[1]
        self.next_layer += 1
        self.progress.update(1)
        if index == len(self.layers) - 1:
            self.progress.close()
        return LayerStats(
            input_cov=(cov / count).cpu(),
            tokens=count,
            input_mean=(input_sum / count).cpu(),
            rotation_cos=rotation[0].cpu(),
            rotation_sin=rotation[1].cpu(),
            attention_sample=attention_sample,
            query_scale_mean=(scale_sums[0] / count).cpu() if scale_sums else None,
            key_scale_mean=(scale_sums[1] / count).cpu() if scale_sums else None,
        )


@dataclass
class CalibrationLayer:
    """One layer of a live calibration, as init, refine, the output refit and allocation see it: its statistics,
    its attention's (arguments, source output) pairs on the calibration text, and the step that moves on to the
    next layer. Moving on is explicit: either `pairs_then_next_layer` (one pass that also feeds the next layer) or
    the calibrator's next `layer` call; `next_layer_through` makes the next layer see this layer's converted
    attention (sequential calibration)."""

    index: int
    stats: LayerStats
    calibrator: "LayerwiseCalibrator"

    @property
    def device(self) -> torch.device:
        return self.calibrator.device

    @property
    def sequences(self) -> tuple[int, int]:
        """(calibration sequences, tokens per sequence)."""
        return self.calibrator.hidden.shape[0], self.calibrator.hidden.shape[1]

    def hidden_energy(self) -> float:
        """Sum of squares of this layer's input hidden states (the residual stream the attention adds to)."""
        return float(self.calibrator.hidden.double().pow(2).sum())

    def attention_pairs(self) -> Iterator[tuple[tuple, dict, torch.Tensor]]:
        return self.calibrator.attention_pairs(self.index)

    def pairs_then_next_layer(self) -> Iterator[tuple[tuple, dict, torch.Tensor]]:
        """The pairs of a pass that also computes the layer's output for the next layer (consume it to the end)."""
        return self.calibrator.attention_pairs(self.index, advance=True)

    def next_layer_through(self, attention: torch.nn.Module) -> None:
        self.calibrator.use_attention(self.index, attention)


class _StopLayer(Exception):
    """Raised by a hook to end a decoder layer's forward once its attention has run."""


def check_calib_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise GtakitError(f"--calib-device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GtakitError(f"--calib-device {device}: CUDA is not available here; use cpu or auto")


def collect_layer_statistics(source: SourceModel, options, progress: bool = False,
                             family: FamilyAdapter | None = None) -> LayerwiseCalibrator:
    ids = calibration_ids(source, options.calib, options.calib_tokens, options.calib_seq_len)
    device = options.calib_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        check_calib_device(device)
    return LayerwiseCalibrator(source, ids, progress=progress, device=device, family=family)
