"""Layer specs: the typed settings of one converted layer, stored as a dict per layer in `config.gtakit_layers`.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Each form module defines its spec class beside its attention module; the converter builds the same class when it
plans a layer, so defaults and validation exist once. `from_dict` refuses fields the form does not have and fills
the defaults that depend on the family's config; `to_dict` is what the config stores.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

QK_NORM_SCOPES = ("head", "all")  # RMS over each head's dims (Qwen3, Gemma 3) or over all heads (OLMo-2)
KEY_SCALES = ("cached", "mean")


def source_head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_pairs(config: Any) -> int:
    """Rotating pairs of the family's RoPE per head (partial rotary counted)."""
    head_dim = source_head_dim(config)
    rope = getattr(config, "rope_parameters", None) or {}
    fraction = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * fraction) // 2


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class LayerSpec:
    """Fields every form has. `rope_index`: which of the family's RoPE frequencies each rotating pair of the
    shared key uses (None: the first ones, cycling when wider than a head)."""

    form: ClassVar[str] = ""
    attention_bias: bool = False
    o_proj_bias: bool = False
    softmax_scale: float | None = None
    softcap: float | None = None  # Gemma 2: scores -> tanh(s / cap) * cap
    qk_norm: dict | None = None  # QK-norm sources: scope, key_scale, eps and key_scales (filled in)
    rope_index: list[int] | None = None

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("softcap", "qk_norm", "rope_index")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, spec: dict, config: Any) -> "LayerSpec":
        """The spec of a stored dict, completed for `config` (the family's); a ValueError naming the field when a
        value is invalid or the field unknown."""
        values = dict(spec)
        form = values.pop("form", cls.form)
        if form != cls.form:
            raise ValueError(f"a {cls.form!r} layer spec was given form {form!r}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} in a {cls.form!r} layer spec; known: "
                             f"{', '.join(cls.field_names())}")
        made = cls(**values)
        made.complete(config)
        return made

    def to_dict(self) -> dict:
        values = {name: getattr(self, name) for name in self.field_names()}
        return {"form": self.form, **{k: v for k, v in values.items()
                                      if v is not None or k not in self.OMITTED_WHEN_NONE}}

    # ------------------------------------------------------------------------------- what a form defines
    def complete(self, config: Any) -> None:
        """Fill the defaults that depend on `config` and check every field."""
        raise NotImplementedError

    def cache_elements(self) -> int:
        """Elements the cache holds per token for one layer of this spec."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- shared checks
    def check_positive(self, *names: str, minimum: int = 1) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")

    def check_divides(self, name: str, total: int, what: str) -> None:
        value = getattr(self, name)
        if total % value:
            raise ValueError(f"`{name}` ({value}) must divide the {total} {what}; valid values: {divisors(total)}")

    def complete_rope_index(self, pairs: int, config: Any, repeat: int = 1) -> None:
        available = rotary_pairs(config)
        if self.rope_index is None:
            self.rope_index = [i % max(1, available) for i in range(pairs // repeat)] * repeat
        self.rope_index = [int(i) for i in self.rope_index]
        if len(self.rope_index) != pairs:
            raise ValueError(f"`rope_index` has {len(self.rope_index)} entries for {pairs} rotating pairs")
        if any(not 0 <= i < available for i in self.rope_index):
            raise ValueError(f"`rope_index` entries must lie in [0, {available}) (the family's RoPE frequencies)")

    def complete_qk_norm(self, config: Any) -> None:
        """Check `qk_norm` and fill in `key_scales`, the scalars it caches per token."""
        norm = self.qk_norm
        if norm is None:
            return
        if not isinstance(norm, dict) or norm.get("scope") not in QK_NORM_SCOPES or \
                norm.get("key_scale") not in KEY_SCALES:
            raise ValueError(f"`qk_norm` must be a dict with scope in {QK_NORM_SCOPES} and key_scale in "
                             f"{KEY_SCALES}, got {norm!r}")
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        scales = 0 if norm["key_scale"] == "mean" else 1 if norm["scope"] == "all" else kv_heads
        self.qk_norm = {"eps": 1e-6, **norm, "key_scales": scales}

    @property
    def key_scales(self) -> int:
        """Key norm scalars cached per token beside the RoPE key (QK-norm sources, `key_scale` cached)."""
        return self.qk_norm["key_scales"] if self.qk_norm else 0
