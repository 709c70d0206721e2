"""Shared fixtures: tiny random configs of every gtakit form and small helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gtakit  # noqa: E402,F401  (registers the Auto classes)
from gtakit.models import FORMS, GtakitConfig, layer_cache_elements  # noqa: E402

from sources import COMMON as BASE  # noqa: E402
from sources import LLAMA3_ROPE  # noqa: E402

# Fields of each form's layer spec; everything else configures the source (Llama) model around the attention.
SPEC_FIELDS = {
    "gta": ("num_key_value_heads", "head_dim", "rope_dim"),
    "gla": ("num_latent_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    "ghla": ("num_maps", "num_key_heads", "head_dim", "latent_dim", "v_head_dim"),
}
COMMON_SPEC = ("attention_bias", "o_proj_bias", "softmax_scale", "rope_index")


def form_config(form: str, spec: dict, **overrides) -> GtakitConfig:
    """A Llama-family gtakit config whose every layer is `form` with `spec` (overrides go to the spec when they
    are spec fields, else to the source config)."""
    from transformers import LlamaConfig

    source = dict(BASE, num_key_value_heads=2, head_dim=16)
    own = {key: overrides.pop(key) for key in ("decode_backend",) if key in overrides}
    spec = {"form": form, **spec}
    for key, value in overrides.items():
        if key in SPEC_FIELDS[form] or key in COMMON_SPEC:
            spec[key] = value
        else:
            source[key] = value
    config = LlamaConfig(**source)
    return GtakitConfig.from_source(config, [dict(spec) for _ in range(config.num_hidden_layers)], **own)


def gta_config(**overrides) -> GtakitConfig:
    return form_config("gta", dict(num_key_value_heads=2, head_dim=16, rope_dim=8), **overrides)


def gla_config(**overrides) -> GtakitConfig:
    return form_config("gla", dict(num_latent_heads=2, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                   v_head_dim=16), **overrides)


def ghla_config(**overrides) -> GtakitConfig:
    return form_config("ghla", dict(num_maps=2, num_key_heads=1, head_dim=16, latent_dim=24, v_head_dim=16),
                       **overrides)


def layer_spec(config: GtakitConfig, index: int = 0) -> dict:
    """The normalised spec of a layer (defaults filled in)."""
    spec = config.gtakit_layers[index]
    return FORMS[spec["form"]].normalise_spec(spec, config.source_config())


def elements_per_layer(config: GtakitConfig, index: int = 0) -> int:
    return layer_cache_elements(config.gtakit_layers[index], config.source_config())


TINY_CONFIGS = {
    "gta-g2": lambda: gta_config(),
    "gta-g1-mqa": lambda: gta_config(num_key_value_heads=1),
    "gta-g4-mha-bias": lambda: gta_config(num_key_value_heads=4, attention_bias=True, o_proj_bias=True),
    "gta-full-rope": lambda: gta_config(rope_dim=16, tie_word_embeddings=True),
    "mla": lambda: gla_config(num_latent_heads=1, kv_lora_rank=32),
    "gla2-bias": lambda: gla_config(attention_bias=True, o_proj_bias=True),
    "gla4": lambda: gla_config(num_latent_heads=4, kv_lora_rank=12, qk_nope_head_dim=4, v_head_dim=12),
    "gla2-no-nope-wide-rope": lambda: gla_config(qk_nope_head_dim=0, qk_rope_head_dim=40, softmax_scale=0.25),
    "gla-llama3-rope": lambda: gla_config(rope_parameters=LLAMA3_ROPE),
    # Latent narrower than the no-RoPE key: prefill runs in the latent space.
    "gla2-narrow-latent": lambda: gla_config(kv_lora_rank=6, qk_nope_head_dim=12, attention_bias=True),
    # Dynamic NTK rescales frequencies once a sequence outgrows the trained length, so a cached decode and a
    # full forward differ past it by design (as in transformers); here the tests stay inside that length.
    "gta-dynamic-rope": lambda: gta_config(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    "ghla-m2-k1": lambda: ghla_config(),
    # One map per head (the converter's default): prefill decodes values per head before attending.
    "ghla-m4-k1": lambda: ghla_config(num_maps=4),
    # Latent narrower than a head's value (zero-padded residual), two key heads, biases everywhere.
    "ghla-m4-k2-bias": lambda: ghla_config(num_maps=4, num_key_heads=2, latent_dim=12, attention_bias=True,
                                           o_proj_bias=True),
    "ghla-m1-llama3-rope": lambda: ghla_config(num_maps=1, head_dim=8, latent_dim=40, rope_parameters=LLAMA3_ROPE,
                                               tie_word_embeddings=True),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request):
    return TINY_CONFIGS[request.param]()


def build_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves biases at zero; give them values so the bias paths are exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def calib_setup(tmp_path_factory):
    """Two tiny sources (Llama-3 RoPE GQA; Qwen2 with biases) and a calibration text, shared read-only by the
    calibration and refinement tests."""
    from sources import random_text, write_source

    root = tmp_path_factory.mktemp("calib")
    models = {name: write_source(name, root / name) for name in ("llama-gqa-llama3rope", "qwen2-bias")}
    text = root / "calib.txt"
    text.write_text(random_text(4000, seed=3))
    return root, models, text
