"""What the converter needs to know about a source family, in one place per family (see `llama.py`).

A `FamilyAdapter` reads one layer's attention (q/k/v/o, biases, fused projections split) into the family-neutral
`SourceAttention`, names the weights the calibration pass runs, says how the family's RoPE is laid out and refuses,
in one line, what it cannot convert faithfully. Everything else (norms, MLP, embeddings) is copied verbatim under
the source's names: a converted model is the family's own transformers model with its attention replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from gtakit.errors import GtakitError
from gtakit.io.source import WeightReader
from gtakit.models.spec_gtakit import rotary_pairs, source_head_dim


@dataclass
class SourceAttention:
    """One source attention layer in float64. Rows follow HF layout (head-major, rotate-half inside a head)."""

    wq: torch.Tensor  # [H*d, D]
    wk: torch.Tensor  # [G*d, D]
    wv: torch.Tensor  # [G*d, D]
    wo: torch.Tensor  # [D, H*d]
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor  # [d/2], the family's RoPE frequencies with static scaling applied
    # QK-norm (None without): RMS over each head ("head") or over all heads ("all"), then these weights (the
    # family's offset such as Gemma's 1 + w included), before RoPE.
    qk_norm_scope: str | None = None
    qk_norm_eps: float = 1e-6
    # Partial rotary (GPT-NeoX): only the first `rotary_pairs` frequencies rotate; the adapter lays the other dims
    # out as pairs of frequency 0 (inv_freq 0), which stay out of the shared RoPE key. None: the whole head.
    rotary_pairs: int | None = None
    q_norm_weight: torch.Tensor | None = None  # [H, d]
    k_norm_weight: torch.Tensor | None = None  # [G, d]

    @property
    def group_of_head(self) -> list[int]:
        per = self.num_heads // self.num_kv_heads
        return [h // per for h in range(self.num_heads)]

    def q_rows(self, head: int) -> slice:
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def kv_rows(self, group: int) -> slice:
        return slice(group * self.head_dim, (group + 1) * self.head_dim)


@dataclass(frozen=True)
class SourceShape:
    """The attention sizes planning needs."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    has_qk_bias: bool
    has_o_bias: bool
    attention_scale: float | None = None  # the family's softmax scale (None: head_dim ** -0.5)
    qk_norm_scope: str | None = None  # "head" or "all" for families with QK-norm
    qk_norm_eps: float = 1e-6
    attention_softcap: float | None = None  # scores -> tanh(s / cap) * cap before the mask (Gemma 2)
    rotary_pairs: int | None = None  # rotating pairs per head when not the whole head (partial rotary)
    rope_free: bool = False  # this layer's source attention has no RoPE (NoPE layers, learned positions)

    @property
    def max_rope_pairs(self) -> int:
        """Rotating pairs per KV head (the most a shared RoPE key can take from each)."""
        return self.rotary_pairs if self.rotary_pairs is not None else self.head_dim // 2

    @property
    def cache_elements(self) -> int:
        """Elements one source layer caches per token (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim


class FamilyAdapter:
    """Base adapter; a family subclasses it and lists its `model_types`."""

    model_types: tuple[str, ...] = ()
    description = ""
    layers_prefix = "model.layers"
    attention_name = "self_attn"
    embedding_name = "model.embed_tokens.weight"
    # checkpoint name -> the name the family's transformers model uses (transformers renames these when loading)
    checkpoint_renames: dict[str, str] = {}
    learned_positions = False  # position embeddings are a table (GPT-2): no position past it exists
    attention_implementation = "sdpa"  # how transformers runs the family's own attention (calibration, kept layers)
    # config.json fields without which transformers would silently take its defaults (a 7B model's widths)
    required_fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    # ------------------------------------------------------------------ refusals (before any work)
    def check_raw(self, raw: dict, path: Path) -> None:
        missing = [name for name in self.required_fields if name not in raw]
        if missing:
            raise GtakitError(f"{path} lacks {', '.join(missing)}; a config must state the model's sizes")

    def check_config(self, config: Any) -> None:
        """Refuse, with one line, anything this adapter cannot convert faithfully."""

    def check_weights(self, config: Any, reader: WeightReader, folder: Path) -> None:
        """Compare the weight files' headers with the config; name the first disagreement."""
        expected = self.expected_shapes(config)
        missing = [name for name in expected if not reader.has(name)]
        if missing:
            raise GtakitError(f"{folder}: the weights lack {missing[0]} (and {len(missing) - 1} more) that "
                              "config.json implies; the checkpoint is incomplete or for another config")
        for name, shape in expected.items():
            actual = reader.shape(name)
            if actual != shape:
                raise GtakitError(f"{folder}: {name} has shape {list(actual)} but config.json implies "
                                  f"{list(shape)}; the weights and the config disagree")
        from gtakit.io.weights import check_reader  # noqa: PLC0415 - transformers' model classes, when checking

        # Names as the family's transformers model has them (nothing randomly initialised, nothing dropped), and
        # only finite values.
        every_layer = frozenset(range(config.num_hidden_layers))
        check_reader(config, reader, folder, [name for name, _ in self.passthrough(reader, config, every_layer)])

    def refuse(self, config: Any, what: str) -> GtakitError:
        return GtakitError(f"model_type {getattr(config, 'model_type', None)!r}: unsupported {what}; "
                           f"gtakit converts {self.description}")

    def expected_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Shapes config.json implies: the embedding and `layer_shapes` of every layer."""
        shapes: dict[str, tuple[int, ...]] = {self.embedding_name: (config.vocab_size, config.hidden_size)}
        for i in range(config.num_hidden_layers):
            shapes.update(self.layer_shapes(config, self.attention_prefix(i), f"{self.layers_prefix}.{i}.mlp."))
        return shapes

    def layer_shapes(self, config: Any, attn: str, mlp: str) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def fused_mha_shape(self, config: Any, weights: WeightReader, fused: str, out: str, **extra: Any) -> SourceShape:
        """The shape of an MHA family whose q/k/v come from one fused projection `fused` (GPT-2, GPT-NeoX)."""
        attn, heads = self.attention_prefix(0), config.num_attention_heads
        return SourceShape(
            hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=heads, head_dim=self.head_dim(config),
            num_layers=config.num_hidden_layers, has_qk_bias=weights.has(attn + fused + ".bias"),
            has_o_bias=weights.has(attn + fused + ".bias") or weights.has(attn + out + ".bias"), **extra,
        )

    # ------------------------------------------------------------------ reading
    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        raise NotImplementedError

    def read_attention(self, weights: WeightReader, config: Any, layer: int) -> SourceAttention:
        raise NotImplementedError

    def attention_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}.{self.attention_name}."

    def is_attention_weight(self, name: str) -> bool:
        return f".{self.attention_name}." in name

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a weight belongs to, or None for embeddings, final norm and head."""
        prefix = self.layers_prefix + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix) :].split(".", 1)[0])

    def passthrough(self, weights: WeightReader, config: Any,
                    kept_layers: frozenset[int] = frozenset()) -> Iterator[tuple[str, int | None]]:
        """(name, layer) of every source weight copied verbatim: all but the attention's, and the attention of the
        layers in `kept_layers` (left in source form)."""
        for name in weights.keys():
            name = self.checkpoint_renames.get(name, name)
            if "rotary_emb" in name or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            layer = self.layer_of(name)
            if not self.is_attention_weight(name) or layer in kept_layers:
                yield name, layer

    def read(self, weights: WeightReader, config: Any, name: str) -> torch.Tensor:
        """The tensor the family's transformers model holds under `name` (families whose checkpoints store it
        in another layout, such as per-expert MoE weights, assemble it here)."""
        if not weights.has(name):
            name = next((old for old, new in self.checkpoint_renames.items() if new == name), name)
        return weights.get(name)

    def inv_freq(self, config: Any) -> torch.Tensor:
        """The family's RoPE inverse frequencies `[pairs]` in float64, as transformers computes them."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type in ROPE_INIT_FUNCTIONS:
            return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0].double()
        dim = 2 * self.rotary_pairs(config)
        exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        return 1.0 / (float(rope.get("rope_theta", 10000.0)) ** exponent)

    def layer_inv_freq(self, config: Any, layer: int) -> torch.Tensor:
        """The RoPE frequencies `layer` rotates with (families with per-layer-kind RoPE override it)."""
        return self.inv_freq(config)

    def layer_has_rope(self, config: Any, layer: int) -> bool:
        """Whether `layer` rotates its queries and keys (NoPE layers and learned-position families do not)."""
        return True

    def attention_scale(self, config: Any) -> float:
        """The softmax scale of the family's attention."""
        return self.head_dim(config) ** -0.5

    def head_dim(self, config: Any) -> int:
        return source_head_dim(config)

    def rotary_pairs(self, config: Any) -> int:
        return rotary_pairs(config)

    # ------------------------------------------------------------------ calibration
    def decoder_layers(self, model: Any) -> Any:
        return model.model.layers

    def rotary(self, model: Any) -> Any:
        return model.model.rotary_emb

    def rope_kind(self, config: Any, layer: int) -> Any:
        """Which RoPE table `layer` reads (layers of one kind share it); one kind unless the family has several."""
        return None

    def position_embeddings(self, rotary: Any, x: torch.Tensor, position_ids: torch.Tensor, kind: Any):
        """(cos, sin) the family's decoder passes to the layers of `kind` (None without RoPE)."""
        return rotary(x, position_ids) if rotary is not None else None

    def embed(self, ids: torch.Tensor, weights: WeightReader, config: Any) -> torch.Tensor:
        """The decoder's input for `ids` `[rows, L]` (families that scale their embeddings or add learned
        positions override it)."""
        # rows gathered before the cast: a 70B vocabulary in fp32 would be 4 GB for nothing
        return torch.nn.functional.embedding(ids, weights.get(self.embedding_name)).float()

    def qk_norm_scales(self, layer: Any, x: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """QK-norm families: the per-token 1/rms of the queries `[N, H or 1]` and keys `[N, G or 1]` of the family's
        attention on normalised inputs `x` `[N, D]`; None for families without QK-norm."""
        return None

    def rotated_queries_keys(self, layer: Any, x: torch.Tensor, cos_sin: Any, config: Any):
        """Queries `[B, H, L, d]` and keys `[B, G, L, d]` of the family's own attention `layer` on normalised
        inputs `x`, RoPE applied (calibration measures attention distances with them)."""
        raise NotImplementedError

    def sliding_window(self, config: Any, layer: int) -> int | None:
        """The attention window of `layer` (None: full causal attention)."""
        window = getattr(config, "sliding_window", None)
        kinds = getattr(config, "layer_types", None)
        if kinds is not None:
            return window if kinds[layer] == "sliding_attention" else None
        return window if getattr(config, "use_sliding_window", True) else None

    def calibration_mask(self, config: Any, layer: int, length: int, device: Any) -> torch.Tensor | None:
        """The mask the family applies in `layer` to a sequence of `length` (boolean `[1, 1, L, L]`, True =
        attend), or None for plain causal attention (which SDPA applies itself; eager families get the mask)."""
        window = self.sliding_window(config, layer)
        if (window is None or window >= length) and self.attention_implementation == "sdpa":
            return None
        positions = torch.arange(length, device=device)
        distance = positions[:, None] - positions[None, :]
        allowed = distance >= 0
        if window is not None:
            allowed &= distance < window
        return allowed[None, None]

    def input_norm(self, layer: Any) -> Any:
        """The norm whose output the attention reads (its input second moment is what calibration measures)."""
        return layer.input_layernorm
