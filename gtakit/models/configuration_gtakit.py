"""Configurations of the gtakit target attention forms (GTA, GLA, MLA and GHLA).

Flat file on purpose: it is copied next to converted weights so that they load with
`trust_remote_code=True` on machines without gtakit. It must import nothing from gtakit.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version
from transformers import PretrainedConfig

# The transformers releases these models are tested with (CI runs the oldest and the newest on PyPI). Outside the
# range generation can go silently wrong (5.24 renamed the cache argument), so loading is refused instead.
SUPPORTED_TRANSFORMERS = ">=5.17,<6"
_OLDEST, _FIRST_UNSUPPORTED = Version("5.17.0"), Version("6.0.0.dev0")  # 6.0 pre-releases are outside too


def check_transformers_version(installed: str = transformers.__version__) -> None:
    if not _OLDEST <= Version(installed) < _FIRST_UNSUPPORTED:
        raise ImportError(
            f"gtakit models need transformers {SUPPORTED_TRANSFORMERS} but {installed} is installed; "
            f"run: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


check_transformers_version()

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def _default_rope_parameters(rope_parameters: dict | None, rope_theta: float | None) -> dict:
    params = dict(rope_parameters or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = float(rope_theta) if rope_theta is not None else 10000.0
    return params


class _LlamaStyleConfig(PretrainedConfig):
    """Fields shared by every gtakit form: a Llama-style decoder (RMSNorm, SwiGLU, RoPE)."""

    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        rope_theta: float | None = None,
        attention_bias: bool = False,
        o_proj_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        softmax_scale: float | None = None,
        decode_backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        # Legacy configs carry `rope_scaling`; fold it into `rope_parameters` like transformers 5 does.
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling and not rope_parameters:
            rope_parameters = dict(rope_scaling)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = _default_rope_parameters(rope_parameters, rope_theta)
        self.attention_bias = attention_bias
        self.o_proj_bias = o_proj_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.softmax_scale = softmax_scale
        self.decode_backend = decode_backend
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"`rope_parameters.rope_type` {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}"
            )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_common()

    def _validate_common(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.decode_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"`decode_backend` must be 'auto', 'torch' or 'triton', got {self.decode_backend!r}")

    @property
    def kv_cache_elements_per_token(self) -> int:
        """Elements the compressed cache stores per token, summed over all layers."""
        return self.kv_cache_elements_per_layer * self.num_hidden_layers


class GTAConfig(_LlamaStyleConfig):
    r"""Grouped-tied attention (Zadouri, Strauss & Dao 2025).

    Each of `num_key_value_heads` groups caches one tied state of width `head_dim` that serves as the value
    and, in its first `head_dim - rope_dim` coordinates, as the no-RoPE part of the key. A single RoPE key of
    width `rope_dim` is shared by all heads. Cache per token per layer: `num_key_value_heads * head_dim + rope_dim`.
    """

    model_type = "gtakit_gta"

    def __init__(
        self,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        hidden_size = kwargs.get("hidden_size", 4096)
        num_heads = kwargs.get("num_attention_heads", 32)
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_heads
        self.rope_dim = rope_dim if rope_dim is not None else self.head_dim // 2
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.head_dim < 2:
            raise ValueError(f"`head_dim` must be at least 2, got {self.head_dim}")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide "
                f"`num_attention_heads` ({self.num_attention_heads})"
            )
        if self.rope_dim % 2:
            raise ValueError(f"`rope_dim` must be even (RoPE rotates pairs), got {self.rope_dim}")
        if not 2 <= self.rope_dim <= self.head_dim:
            raise ValueError(
                f"`rope_dim` ({self.rope_dim}) must be between 2 and `head_dim` ({self.head_dim}) for GTA"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim

    @property
    def kv_cache_elements_per_layer(self) -> int:
        return self.num_key_value_heads * self.head_dim + self.rope_dim


class GLAConfig(_LlamaStyleConfig):
    r"""Grouped latent attention (GLA); MLA is the special case `num_latent_heads = 1`.

    `num_latent_heads` latents of width `kv_lora_rank` are cached; query heads are split in contiguous blocks,
    block j reads latent j through per-head up-projections to a no-RoPE key (`qk_nope_head_dim`, may be 0) and a
    value (`v_head_dim`). One RoPE key of width `qk_rope_head_dim` (may exceed the source head dim) is shared by
    all heads. Cache per token per layer: `num_latent_heads * kv_lora_rank + qk_rope_head_dim`.
    """

    model_type = "gtakit_gla"

    def __init__(
        self,
        num_latent_heads: int = 2,
        kv_lora_rank: int = 256,
        qk_nope_head_dim: int = 64,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        **kwargs: Any,
    ) -> None:
        self.num_latent_heads = num_latent_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.num_latent_heads < 1 or self.num_attention_heads % self.num_latent_heads:
            valid = [n for n in range(1, self.num_attention_heads + 1) if self.num_attention_heads % n == 0]
            raise ValueError(
                f"`num_latent_heads` ({self.num_latent_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads}); valid values: {valid}"
            )
        if self.kv_lora_rank < 1:
            raise ValueError(f"`kv_lora_rank` must be at least 1, got {self.kv_lora_rank}")
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"`qk_nope_head_dim` must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"`qk_rope_head_dim` must be an even number >= 2, got {self.qk_rope_head_dim}")
        if self.v_head_dim < 1:
            raise ValueError(f"`v_head_dim` must be at least 1, got {self.v_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_elements_per_layer(self) -> int:
        return self.num_latent_heads * self.kv_lora_rank + self.qk_rope_head_dim


class GHLAConfig(_LlamaStyleConfig):
    r"""Grouped-head latent attention (GHLA; Sun, Deng et al. 2025, whose paper calls it GTA).

    `num_maps` attention maps per layer, each shared by `num_attention_heads / num_maps` output heads. Map m
    scores with its query of width `head_dim` against key head `m // (num_maps / num_key_heads)`; keys carry RoPE
    on every dimension. One latent value of width `latent_dim` is cached for all heads; each output head decodes
    its map's attended latent with its own linear map (`v_head_dim` wide) plus a parameter-free residual, and a
    sigmoid gate computed from the layer input scales the decoded heads before `o_proj`.
    Cache per token per layer: `num_key_heads * head_dim + latent_dim`.
    """

    model_type = "gtakit_ghla"

    def __init__(
        self,
        num_maps: int = 4,
        num_key_heads: int = 1,
        head_dim: int = 64,
        latent_dim: int = 128,
        v_head_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_maps = num_maps
        self.num_key_heads = num_key_heads
        self.head_dim = head_dim
        self.latent_dim = latent_dim
        self.v_head_dim = v_head_dim if v_head_dim is not None else head_dim
        # Before the base class: transformers' own RoPE validation would reject an odd head_dim less clearly.
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"`head_dim` must be an even number >= 2 (full RoPE rotates pairs), got {head_dim}")
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        heads = self.num_attention_heads
        if self.num_maps < 1 or heads % self.num_maps:
            valid = [n for n in range(1, heads + 1) if heads % n == 0]
            raise ValueError(
                f"`num_maps` ({self.num_maps}) must divide `num_attention_heads` ({heads}); valid: {valid}"
            )
        if self.num_key_heads < 1 or self.num_maps % self.num_key_heads:
            raise ValueError(f"`num_key_heads` ({self.num_key_heads}) must divide `num_maps` ({self.num_maps})")
        if self.latent_dim < 1:
            raise ValueError(f"`latent_dim` must be at least 1, got {self.latent_dim}")
        if self.v_head_dim < 1:
            raise ValueError(f"`v_head_dim` must be at least 1, got {self.v_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim

    @property
    def kv_cache_elements_per_layer(self) -> int:
        return self.num_key_heads * self.head_dim + self.latent_dim
