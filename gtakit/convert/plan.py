"""Conversion settings and the target configuration they imply (defaults, budgets, validation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gtakit.errors import GtakitError
from gtakit.models import GHLAConfig, GLAConfig, GTAConfig

from .source import SourceModel, source_head_dim, source_rope_parameters

TARGETS = ("gta", "gla", "mla", "ghla")


@dataclass
class ConvertOptions:
    """Settings of one conversion (mirrors `gtakit convert` options)."""

    target: str = "gla"
    groups: int | None = None  # GTA: tied-state groups (default: source KV heads)
    latent_heads: int | None = None  # GLA: latent heads (default 2 if it divides H and G, else G)
    kv_rank: int | str | None = None  # GLA/MLA: latent width per latent head, or "full"
    rope_dim: int | str | None = None  # width of the shared RoPE key, or "full" (every component)
    init: str = "auto"
    gta_state: str = "joint"  # GTA: "joint" key/value tied state or "value" (values kept exact)
    maps: int | None = None  # GHLA: attention maps per layer (default: source KV heads, H/4 for MHA)
    key_heads: int | None = None  # GHLA: fully rotary key heads (default 1)
    latent_dim: int | str | None = None  # GHLA: latent value width, or "full"
    ghla_query: str = "auto"  # GHLA map query: auto (measured best), mean (least squares), central head or fit
    calib: str | None = None
    calib_tokens: int = 262144
    calib_seq_len: int = 2048
    calib_device: str = "auto"  # where calibration runs the source layers: auto (cuda if available), cpu, cuda
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    eval_text: str | None = None
    eval_tokens: int = 65536
    eval_window: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TargetPlan:
    target: str
    config: GTAConfig | GLAConfig | GHLAConfig
    source_elements_per_layer: int
    gta_state: str = "joint"
    ghla_query: str = "auto"

    @property
    def target_elements_per_layer(self) -> int:
        return self.config.kv_cache_elements_per_layer


def _as_int(value: Any, name: str) -> int | str | None:
    if value is None or value == "full":
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GtakitError(f"--{name} must be an integer or 'full', got {value!r}") from None


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def source_has_bias(source: SourceModel, proj: str) -> bool:
    return source.weights.has(f"model.layers.0.self_attn.{proj}.bias")


def plan_target(source: SourceModel, options: ConvertOptions) -> TargetPlan:
    cfg = source.config
    if options.target not in TARGETS:
        raise GtakitError(f"--to must be one of {', '.join(TARGETS)}, got {options.target!r}")
    H = cfg.num_attention_heads
    G = getattr(cfg, "num_key_value_heads", None) or H
    d = source_head_dim(cfg)
    D = cfg.hidden_size
    rope = source_rope_parameters(cfg)
    if rope.get("rope_type") == "dynamic":
        rope["original_head_dim"] = d
    has_qk_bias = source_has_bias(source, "q_proj") or source_has_bias(source, "k_proj")
    has_o_bias = source_has_bias(source, "v_proj") or source_has_bias(source, "o_proj")
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=D,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=H,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=getattr(cfg, "initializer_range", 0.02),
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        rope_parameters=rope,
        attention_bias=has_qk_bias,
        o_proj_bias=has_o_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        softmax_scale=d**-0.5,
    )
    source_elements = 2 * G * d
    rope_dim = _as_int(options.rope_dim, "rope-dim")
    kv_rank = _as_int(options.kv_rank, "kv-rank")

    if options.target == "ghla":
        return _plan_ghla(options, common, H, G, d, D, rope_dim, kv_rank, source_elements)
    ghla_only = [f"--{name}" for name, value in (("maps", options.maps), ("key-heads", options.key_heads),
                                                  ("latent-dim", options.latent_dim)) if value is not None]
    if ghla_only:
        raise GtakitError(f"{', '.join(ghla_only)} apply to --to ghla only")

    if options.target == "gta":
        if options.latent_heads is not None or kv_rank is not None:
            raise GtakitError("--latent-heads and --kv-rank apply to --to gla/mla, not gta (use --groups, --rope-dim)")
        groups = options.groups if options.groups is not None else G
        if groups < 1 or H % groups:
            raise GtakitError(f"--groups {groups} must divide the {H} query heads; valid: {_divisors(H)}")
        if rope_dim is None:
            rope_dim = d // 2
        elif rope_dim == "full":
            rope_dim = d
        _check_rope_dim(rope_dim, d)
        if options.gta_state not in ("joint", "value"):
            raise GtakitError(f"--gta-state must be joint or value, got {options.gta_state!r}")
        config = GTAConfig(num_key_value_heads=groups, head_dim=d, rope_dim=rope_dim, **common)
        return TargetPlan("gta", config, source_elements, gta_state=options.gta_state)

    if options.groups is not None:
        raise GtakitError("--groups applies to --to gta; for gla/mla use --latent-heads")
    if options.target == "mla":
        if options.latent_heads not in (None, 1):
            raise GtakitError("--to mla has exactly one latent head; use --to gla for --latent-heads > 1")
        latents = 1
    else:
        latents = options.latent_heads
        if latents is None:
            latents = 2 if H % 2 == 0 and G % 2 == 0 else G
    if latents < 1 or H % latents:
        raise GtakitError(
            f"--latent-heads {latents} must divide the {H} query heads; valid counts: {_divisors(H)}"
        )
    max_rope = G * d
    if rope_dim is None:
        # About a third of the cache (the half-cache default budget, or what --kv-rank implies).
        budget = source_elements // 2 if kv_rank in (None, "full") else latents * kv_rank * 3 // 2
        rope_dim = min(default_rope_dim(budget, d), max_rope)
    elif rope_dim == "full":
        rope_dim = max_rope
    _check_rope_dim(rope_dim, max_rope)
    nope_dim = 0 if rope_dim == max_rope else d
    per_latent = H // latents
    per_kv = H // G
    latent_kv = [sorted({h // per_kv for h in range(j * per_latent, (j + 1) * per_latent)}) for j in range(latents)]
    full_rank = max(min((2 if nope_dim else 1) * len(kv) * d, D) for kv in latent_kv)
    if kv_rank is None:
        # The papers' budget (4 head dims of latent in total: MLA 512 + 64, GLA-2 2 x 256 + 64 at d = 128),
        # but never more than half the source's cache.
        half_budget = (source_elements // 2 - rope_dim) // latents
        kv_rank = max(1, min(4 * d // latents, full_rank, half_budget))
    elif kv_rank == "full":
        kv_rank = full_rank
    if not 1 <= kv_rank <= full_rank:
        raise GtakitError(f"--kv-rank {kv_rank} is out of range: it must be between 1 and {full_rank} for this model")
    config = GLAConfig(
        num_latent_heads=latents,
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=d,
        **common,
    )
    return TargetPlan(options.target, config, source_elements)


def default_rope_dim(budget: int, head_dim: int) -> int:
    """Shared RoPE key width for a GLA/MLA cache of `budget` elements per token and layer.

    About a third of the budget, at least 24 (12 rotating pairs) and at most min(64, head_dim) (DeepSeek's 64)
    and half the budget, rounded down to a multiple of 8 (of 2 below 24). Measured on SmolLM2
    (benchmarks/rope_split.py, MLA): 64 of 192 beats 32, 48, 80 and 96; 32 of 96 beats 48; 24 of 48 beats 16
    and 32.
    """
    upper = min(64, head_dim, max(2, budget // 2))
    width = min(upper, max(24, budget // 3))
    width = width // 8 * 8 if width >= 24 else width
    return max(2, width - width % 2)


def _check_rope_dim(rope_dim: int, maximum: int) -> None:
    if rope_dim % 2:
        raise GtakitError(f"--rope-dim {rope_dim} must be even (RoPE rotates pairs of dimensions)")
    if not 2 <= rope_dim <= maximum:
        raise GtakitError(f"--rope-dim {rope_dim} is out of range: it must be between 2 and {maximum}")


def _plan_ghla(
    options: ConvertOptions, common: dict, H: int, G: int, d: int, D: int, rope_dim, kv_rank, source_elements: int
) -> TargetPlan:
    """GHLA: `--maps` maps sharing `--key-heads` fully rotary keys of width `--rope-dim`, one latent value."""
    if options.groups is not None or options.latent_heads is not None or kv_rank is not None:
        raise GtakitError("--groups, --latent-heads and --kv-rank do not apply to --to ghla (use --maps, "
                          "--key-heads, --latent-dim, --rope-dim)")
    maps = options.maps if options.maps is not None else (G if G < H else (H // 4 if H % 4 == 0 else H))
    if maps < 1 or H % maps:
        raise GtakitError(f"--maps {maps} must divide the {H} query heads; valid: {_divisors(H)}")
    key_heads = options.key_heads if options.key_heads is not None else 1
    valid_keys = [k for k in _divisors(G) if maps % k == 0]
    if key_heads not in valid_keys:
        raise GtakitError(
            f"--key-heads {key_heads} must divide both the {G} source KV heads and --maps {maps}; valid: {valid_keys}"
        )
    max_key = (G // key_heads) * d
    if rope_dim is None:
        rope_dim = d
    elif rope_dim == "full":
        rope_dim = max_key
    _check_rope_dim(rope_dim, max_key)
    full_latent = min(G * d, D)
    latent = _as_int(options.latent_dim, "latent-dim")
    if latent is None:
        # Half the source cache in total (their 1B model: 64 key + 128 latent), at least one head dim.
        latent = min(full_latent, max(d, source_elements // 2 - key_heads * rope_dim))
    elif latent == "full":
        latent = full_latent
    if not 1 <= latent <= full_latent:
        raise GtakitError(f"--latent-dim {latent} is out of range: it must be between 1 and {full_latent}")
    if options.ghla_query not in ("auto", "mean", "central", "fit"):
        raise GtakitError(f"--ghla-query must be auto, mean, central or fit; got {options.ghla_query!r}")
    config = GHLAConfig(
        num_maps=maps, num_key_heads=key_heads, head_dim=rope_dim, latent_dim=latent, v_head_dim=d, **common
    )
    return TargetPlan("ghla", config, source_elements, ghla_query=options.ghla_query)
