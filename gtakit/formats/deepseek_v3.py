"""DeepSeek-V3 output format: a gtakit MLA model written as a native `deepseek_v3` checkpoint (no remote code), so
transformers, vLLM, SGLang and llama.cpp serve it with their own MLA code.

What the format pins down (../shared/notes/deepseek-export.md) and how a gtakit MLA meets it:

* one RoPE table for the whole model, theta'^(-2j/r): conversion keeps the source frequencies 0, k, 2k, ... in
  every layer (`--rope-grid`), one component each, so theta' = theta^(k r / d) reproduces them exactly;
* interleaved RoPE pairs: the RoPE rows are permuted from gtakit's rotate-half layout;
* softmax scale (n + r)^-1/2: the ratio to gtakit's scale is folded into the query rows;
* the latent RMSNorm: see `latent_norm.py` (refit: portable; anchor: exact in transformers);
* a dense model: every layer below `first_k_dense_replace`, with integer expert fields the loaders expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch

from gtakit.errors import GtakitError
from gtakit.models import GtakitConfig, GtakitForCausalLM

from . import latent_norm
from .latent_norm import LatentMoments
from .memory import MemorySink

FAMILIES = ("llama", "mistral", "qwen2")  # SiLU-gated MLP and plain RMSNorms: DeepSeek's dense layer
ROPE_TYPES = ("default", "llama3", "linear")  # scalings that act on each frequency alone (commute with a subset)
LATENT_NORMS = ("refit", "anchor")
CONSTRAINTS = frozenset({"global-rope-grid", "one-latent"})
HINT = "DeepSeek-V3 attention is MLA: use --to mla"


@dataclass
class Geometry:
    """The widths every layer shares, and what the RoPE table and scale become."""

    heads: int
    kv_rank: int
    nope: int
    rope: int
    value: int
    stride: int
    theta: float  # the DeepSeek table's base theta'
    query_scale: float  # gtakit's softmax scale / DeepSeek's, folded into the queries


def check_layers(config: GtakitConfig) -> None:
    """What can be refused before conversion: the family, and layers that are not one uniform MLA."""
    family = config.source_model_type
    if family not in FAMILIES:
        raise GtakitError(f"the deepseek-v3 format takes {', '.join(FAMILIES)} sources (DeepSeek's dense layer is "
                          f"theirs); {family} is not one")
    _check_family_config(config)
    specs = config.gtakit_layers
    if any(spec["form"] != "gla" or spec.get("num_latent_heads") != 1 for spec in specs):
        raise GtakitError(f"the deepseek-v3 format holds MLA in every layer (one latent); {HINT} without --layer")
    keys = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "softmax_scale")
    if any(tuple(str(s.get(k)) for k in keys) != tuple(str(specs[0].get(k)) for k in keys) for s in specs):
        raise GtakitError("the deepseek-v3 format has one latent and RoPE width for all layers; convert without "
                          "per-layer --layer widths")
    spec = specs[0]
    if spec.get("qk_norm") is not None or spec.get("softcap") is not None:
        raise GtakitError("the deepseek-v3 format has no QK-norm or soft-capping")
    if spec["qk_nope_head_dim"] < 1 or spec["qk_rope_head_dim"] < 2:
        raise GtakitError("the deepseek-v3 format needs a position-free key and a RoPE key (--rope-dim below 'full')")


def geometry(config: GtakitConfig) -> Geometry:
    """Check that `config` is an MLA DeepSeek-V3 can hold; one line saying why not otherwise."""
    check_layers(config)
    spec = config.gtakit_layers[0]
    stride = _grid_stride([s["rope_index"] for s in config.gtakit_layers])
    head_dim = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    theta = float(_rope_parameters(config)["rope_theta"]) ** (stride * spec["qk_rope_head_dim"] / head_dim)
    own_scale = spec["softmax_scale"] if spec.get("softmax_scale") else (spec["qk_nope_head_dim"]
                                                                          + spec["qk_rope_head_dim"]) ** -0.5
    deepseek_scale = (spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"]) ** -0.5
    return Geometry(config.num_attention_heads, spec["kv_lora_rank"], spec["qk_nope_head_dim"],
                    spec["qk_rope_head_dim"], spec["v_head_dim"], stride, theta, own_scale / deepseek_scale)


def _check_family_config(config: GtakitConfig) -> None:
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise GtakitError("the deepseek-v3 format's MLP is SiLU-gated without biases; this source's is not")
    windows = [t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"]
    if windows or (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        raise GtakitError("the deepseek-v3 format has no sliding-window attention; this source uses it")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise GtakitError(f"the deepseek-v3 export takes RoPE scaling {', '.join(ROPE_TYPES)}; this source has "
                          f"{rope_type}")


def _rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in params:  # older configs keep it beside
        params = {"rope_type": "default", **params, "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return dict(params)


def grid_stride(index: list[int]) -> int | None:
    """k when `index` is 0, k, 2k, ... (a global RoPE table); None otherwise."""
    if not index or index[0] != 0:
        return None
    stride = index[1] if len(index) > 1 else 1
    return stride if stride > 0 and index == [stride * j for j in range(len(index))] else None


def _grid_stride(indices: list[list[int]]) -> int:
    stride = grid_stride(list(indices[0]))
    if stride is None or any(list(index) != list(indices[0]) for index in indices):
        raise GtakitError("this MLA keeps different RoPE frequencies than one global table holds; convert it with "
                          "--rope-grid fastest (or --format deepseek-v3), then uptrain and export")
    return stride


def deepseek_config(config: GtakitConfig, geo: Geometry, variant: str, q_anchor: bool, dtype: torch.dtype):
    """The `DeepseekV3Config` of the export (transformers validates every field)."""
    from transformers import DeepseekV3Config

    layers, hidden = config.num_hidden_layers, config.hidden_size
    rope = {**_rope_parameters(config), "rope_theta": geo.theta}
    anchored = variant == "anchor"
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=hidden, intermediate_size=config.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=geo.heads, num_key_value_heads=geo.heads,
        q_lora_rank=hidden + 1 if q_anchor else None, kv_lora_rank=geo.kv_rank + 1,
        qk_nope_head_dim=geo.nope, qk_rope_head_dim=geo.rope, v_head_dim=geo.value, rope_interleave=True,
        rope_parameters=rope, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, hidden_act="silu", attention_bias=anchored,
        # Two routed experts that no layer uses (all dense): llama.cpp asserts expert groups < experts.
        first_k_dense_replace=layers, n_routed_experts=2, n_shared_experts=1,
        moe_intermediate_size=config.intermediate_size, num_experts_per_tok=1, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, num_nextn_predict_layers=0, tie_word_embeddings=False,
        initializer_range=getattr(config, "initializer_range", 0.02),
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    out = DeepseekV3Config(**fields)
    out.architectures = ["DeepseekV3ForCausalLM"]
    out.dtype = str(dtype).removeprefix("torch.")
    return out


# ------------------------------------------------------------------------------------------------ statistics


def attention_modules(model: GtakitForCausalLM) -> list[torch.nn.Module]:
    path, name = model.config.gtakit_layers_path, model.config.gtakit_attention_name
    layers = model.get_submodule(path)
    return [getattr(layer, name) for layer in layers]


def needs_input_moments(model: GtakitForCausalLM) -> bool:
    """Whether a query, latent or RoPE-key bias must be absorbed (refit variant)."""
    for attn in attention_modules(model):
        for proj in (attn.q_proj, attn.kv_down_proj, getattr(attn, "k_rope_proj", None)):
            if proj is not None and proj.bias is not None and bool(proj.bias.any()):
                return True
    return False


@torch.no_grad()
def collect_moments(model: GtakitForCausalLM, ids: torch.Tensor, variant: str,
                    progress: Callable[[str], None] = lambda m: None) -> list[LatentMoments]:
    """One forward of `model` over `ids` per pass; the latents' moments per layer (and input moments first when
    the refit variant must absorb biases)."""
    modules = attention_modules(model)
    moments = [LatentMoments() for _ in modules]
    absorbed: list[torch.Tensor | None] = [None] * len(modules)
    if variant == "refit":
        progress("latent norm: input moments (ballast direction, bias absorption)")
        _run_hooks(model, ids, modules, lambda i, x, c: moments[i].add_inputs(x, c))
        for m in moments:
            m.finish_inputs()
        if needs_input_moments(model):
            absorbed = [latent_norm.absorb_bias(m.kv_down_proj.weight.double(), _bias(m.kv_down_proj), moments[i])
                        for i, m in enumerate(modules)]
    progress("latent norm: latent moments")
    _run_hooks(model, ids, modules, lambda i, x, c: moments[i].add_latents(x, c, absorbed[i]))
    return moments


def _run_hooks(model, ids: torch.Tensor, modules, consume) -> None:
    handles = [m.kv_down_proj.register_forward_hook(
        lambda mod, args, out, i=i: consume(i, args[0].reshape(-1, args[0].shape[-1]).double(),
                                            out.reshape(-1, out.shape[-1]).double()))
        for i, m in enumerate(modules)]
    try:
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _bias(linear: torch.nn.Linear) -> torch.Tensor | None:
    return linear.bias.double() if linear.bias is not None else None


# ------------------------------------------------------------------------------------------------- tensors


def interleave_rows(rows: torch.Tensor, pairs: int) -> torch.Tensor:
    """Rotate-half RoPE rows [x_0..x_P-1, y_0..y_P-1] -> interleaved [x_0, y_0, x_1, y_1, ...]."""
    order = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], dim=1).flatten()
    return rows[order]


def attention_tensors(attn: torch.nn.Module, geo: Geometry, moments: LatentMoments, variant: str,
                      q_anchor: bool, fits: list) -> dict[str, torch.Tensor]:
    """One layer's DeepSeek-V3 attention tensors (float64), names relative to `self_attn`; the refit variant
    appends its `latent_norm.Refit` to `fits`.

    Both variants add one latent coordinate that keeps the norm nearly constant: refit, a "ballast" row along the
    input direction whose projection varies least from token to token (no bias, so portable); anchor, a zero row
    with a large constant bias (exact where biases are honoured)."""
    H, n, r, v, c = geo.heads, geo.nope, geo.rope, geo.value, geo.kv_rank
    refit = variant == "refit"
    q_w = attn.q_proj.weight.double()
    q_b = _bias(attn.q_proj)
    down_w, down_b = attn.kv_down_proj.weight.double(), _bias(attn.kv_down_proj)
    rope_w, rope_b = attn.k_rope_proj.weight.double(), _bias(attn.k_rope_proj)
    if refit:  # no biases in vLLM / llama.cpp: absorb them by least squares on the attention inputs
        q_w, down_w, rope_w = (latent_norm.absorb_bias(w, b, moments) for w, b in
                               ((q_w, q_b), (down_w, down_b), (rope_w, rope_b)))
        q_b = down_b = rope_b = None
    query = _query_rows(q_w, H, n, r) * geo.query_scale
    up = _kv_up(attn, H, n, v, c)  # [H (n + v), c]: per head [k_nope; v]
    out: dict[str, torch.Tensor] = {"kv_a_layernorm.weight": torch.ones(c + 1, dtype=torch.float64)}
    o_w, o_b = attn.o_proj.weight.double(), _bias(attn.o_proj)
    if refit:
        offset = _value_offset(o_w, o_b, H, n, v) if o_b is not None else None
        fit = latent_norm.refit(up, offset, moments)
        ballast = (fit.weight * moments.latent_scale * moments.ballast)[None, :]
        out["kv_a_proj_with_mqa.weight"] = torch.cat([fit.scale * down_w, fit.scale * ballast,
                                                      interleave_rows(rope_w, r // 2)])
        out["kv_b_proj.weight"] = fit.up
        fits.append(fit)
    else:
        big = latent_norm.anchor_bias(moments)
        zero_row = down_w.new_zeros(1, down_w.shape[1])
        out["kv_a_proj_with_mqa.weight"] = torch.cat([down_w, zero_row, interleave_rows(rope_w, r // 2)])
        latent_bias = down_b if down_b is not None else down_w.new_zeros(c)
        rope_bias = interleave_rows(rope_b, r // 2) if rope_b is not None else down_w.new_zeros(r)
        out["kv_a_proj_with_mqa.bias"] = torch.cat([latent_bias, torch.tensor([big], dtype=torch.float64), rope_bias])
        out["kv_b_proj.weight"] = torch.cat([up * (big / math.sqrt(c + 1)), up.new_zeros(up.shape[0], 1)], dim=1)
        out["o_proj.bias"] = o_b if o_b is not None else o_w.new_zeros(o_w.shape[0])
    out["o_proj.weight"] = o_w
    out.update(_query_tensors(query, q_b * geo.query_scale if q_b is not None else None, H, n, r, q_anchor,
                              moments))
    return out


def _query_rows(q_w: torch.Tensor, H: int, n: int, r: int) -> torch.Tensor:
    """Per head [nope; rope], the RoPE rows interleaved."""
    heads = q_w.view(H, n + r, -1)
    return torch.cat([torch.cat([h[:n], interleave_rows(h[n:], r // 2)]) for h in heads])


def _query_tensors(query: torch.Tensor, q_bias: torch.Tensor | None, H: int, n: int, r: int, q_anchor: bool,
                   moments: LatentMoments) -> dict[str, torch.Tensor]:
    if not q_anchor:
        return {"q_proj.weight": query}
    # The query bias through DeepSeek's low-rank query path (its only biased query projection): q_a = [x; B],
    # whose norm is ~B for every token, so q_a_layernorm is a constant the up-projection undoes.
    hidden = query.shape[1]
    big = latent_norm.anchored_input_bias(moments)
    factor = math.sqrt(hidden + 1) / big
    q_a = torch.cat([torch.eye(hidden, dtype=torch.float64), query.new_zeros(1, hidden)])
    bias = torch.cat([query.new_zeros(hidden), torch.tensor([big], dtype=torch.float64)])
    rows = _query_rows(q_bias[:, None], H, n, r)[:, 0] if q_bias is not None else query.new_zeros(query.shape[0])
    q_b = torch.cat([query / factor, rows[:, None] / math.sqrt(hidden + 1)], dim=1)
    return {"q_a_proj.weight": q_a, "q_a_proj.bias": bias, "q_a_layernorm.weight": torch.ones(hidden + 1,
            dtype=torch.float64), "q_b_proj.weight": q_b}


def _kv_up(attn: torch.nn.Module, H: int, n: int, v: int, c: int) -> torch.Tensor:
    k_up = attn.k_up_proj.weight.double().view(H, n, c)
    v_up = attn.v_up_proj.weight.double().view(H, v, c)
    return torch.cat([k_up, v_up], dim=1).reshape(H * (n + v), c)


def _value_offset(o_w: torch.Tensor, o_b: torch.Tensor, H: int, n: int, v: int) -> torch.Tensor:
    """A per-head constant value u with o_proj(u) = the output bias (least norm), as kv_b_proj rows' offsets:
    attention weights sum to 1, so a constant value adds exactly o_proj(u)."""
    values = torch.linalg.lstsq(o_w, o_b[:, None]).solution[:, 0].view(H, v)
    return torch.cat([o_w.new_zeros(H, n), values], dim=1).flatten()


# ---------------------------------------------------------------------------------------------------- sink


class DeepSeekV3Sink(MemorySink):
    """Collects the converted MLA (in float32, like the in-memory format); `finish` fits the latent norm and
    writes the DeepSeek-V3 folder (see `gtakit.convert.export`)."""

    name = "deepseek-v3"
    constraints = CONSTRAINTS
    hint = HINT


def q_anchor_needed(model: GtakitForCausalLM, variant: str) -> bool:
    return variant == "anchor" and any(a.q_proj.bias is not None and bool(a.q_proj.bias.any())
                                       for a in attention_modules(model))


@torch.no_grad()
def write_deepseek_v3(model: GtakitForCausalLM, folder, dtype: torch.dtype, variant: str,
                      moments: list[LatentMoments], max_shard_size: str | int = "5GB"):
    """Stream the DeepSeek-V3 tensors of `model` into sharded safetensors and config.json in `folder`; returns
    the written `DeepseekV3Config` and the refit variant's per-layer fits."""
    from transformers import DeepseekV3ForCausalLM

    from .shards import StreamingShardWriter

    config = model.config
    geo = geometry(config)
    q_anchor = q_anchor_needed(model, variant)
    ds_config = deepseek_config(config, geo, variant, q_anchor, dtype)
    with torch.device("meta"):
        planned = {k: t.to(dtype) for k, t in DeepseekV3ForCausalLM(ds_config).state_dict().items()}
    writer = StreamingShardWriter(folder, planned, max_shard_size)
    attention_prefix = f"{config.gtakit_layers_path}."
    for name, tensor in model.state_dict().items():
        if not (name.startswith(attention_prefix) and f".{config.gtakit_attention_name}." in name):
            writer.add(name, tensor)  # embeddings, MLPs and norms keep their names (Llama's are DeepSeek's)
    if config.tie_word_embeddings:  # vLLM reads lm_head.weight even for a tied source
        writer.add("lm_head.weight", model.get_input_embeddings().weight.clone())
    fits: list[latent_norm.Refit] = []
    for index, attn in enumerate(attention_modules(model)):
        prefix = f"{attention_prefix}{index}.{config.gtakit_attention_name}."
        for name, tensor in attention_tensors(attn, geo, moments[index], variant, q_anchor, fits).items():
            writer.add(prefix + name, tensor)
    writer.finish()
    ds_config.save_pretrained(folder)
    return ds_config, fits
