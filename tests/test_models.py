"""Foundation guarantees of the GTA / GLA / MLA models and their compressed cache (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE, build_model, ghla_config, gla_config, gta_config
from sources import LLAMA3_ROPE
from transformers import LlamaConfig, LlamaForCausalLM

from gtakit.models import CompressedKVCache, GHLAConfig, GLAConfig, GTAConfig, output_cache
from gtakit.models.cache_gtakit import CACHE_FIELD


def _ids(batch=2, length=13, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=generator)


@torch.no_grad()
def test_incremental_decoding_matches_full_forward(tiny_config):
    model = build_model(tiny_config)
    ids = _ids(length=20)
    full = model(ids, use_cache=False).logits

    out = model(ids[:, :5])
    cache = output_cache(out)
    assert isinstance(cache, CompressedKVCache)
    pieces = [out.logits]
    for t in range(5, 11):  # one token at a time
        out = model(ids[:, t : t + 1], cache=cache)
        pieces.append(out.logits)
    for start in (11, 14):  # then chunks (speculative-decoding sized, and longer)
        end = min(start + 3 if start == 11 else 20, 20)
        out = model(ids[:, start:end], cache=cache)
        pieces.append(out.logits)
    incremental = torch.cat(pieces, dim=1)
    assert incremental.shape == full.shape
    assert (incremental - full).abs().max().item() < 1e-4
    assert cache.get_seq_length() == 20


@torch.no_grad()
def test_generate_equals_no_cache_greedy_loop(tiny_config):
    model = build_model(tiny_config)
    prompt = _ids(batch=1, length=6)
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    seq = prompt
    for _ in range(10):
        next_token = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(generated, seq)


def assert_holds_compressed_state(cache, config, batch: int, tokens: int) -> None:
    """Every layer of `cache` holds `tokens` positions of the compressed state only (no per-head keys/values)."""
    assert cache.get_seq_length() == tokens
    for layer in cache.layers:
        state, second = layer.keys, layer.values
        assert state.shape[0] == second.shape[0] == batch
        assert state.shape[-2] == second.shape[-2] == tokens
        assert state[0, :, 0].numel() + second[0, :, 0].numel() == config.kv_cache_elements_per_layer


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_cache_holds_every_token(tiny_config, batch):
    """generate() writes into the compressed cache at every step: after N new tokens it holds prompt + N - 1
    positions (the last token is never fed back), each of the compressed width."""
    model = build_model(tiny_config)
    prompt, new = 4, 5
    out = model.generate(_ids(batch=batch, length=prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (batch, prompt + new)
    assert_holds_compressed_state(output_cache(out), tiny_config, batch, prompt + new - 1)


@torch.no_grad()
def test_generate_continues_a_caller_cache(tiny_config):
    """A cache filled by a forward pass and handed to generate() is extended in place, not replaced, and gives the
    tokens a fresh generate() gives. forward() takes the cache as `cache` (transformers >= 5.24) or as
    `past_key_values` (before), whatever the installed release passes."""
    model = build_model(tiny_config)
    ids = _ids(batch=1, length=7)
    cache = output_cache(model(ids[:, :5]))
    assert isinstance(cache, CompressedKVCache)
    assert output_cache(model(ids[:, 5:6], past_key_values=cache)) is cache
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         **{CACHE_FIELD: cache})
    assert output_cache(out) is cache and cache.get_seq_length() == 7 + 4 - 1
    fresh = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, fresh)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :2], cache=CompressedKVCache(config=tiny_config), past_key_values=cache)


@torch.no_grad()
def test_no_deprecation_warnings_from_the_models(tiny_config):
    """transformers 5.24 deprecates names (past_key_values, gradient_checkpointing_enable) with FutureWarnings;
    generation and cached forwards of the models must not trigger any on the installed release."""
    import warnings

    model = build_model(tiny_config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model.generate(_ids(batch=2, length=5), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        model(_ids(batch=2, length=1), **{CACHE_FIELD: output_cache(out)})


def test_static_cache_is_refused_in_one_line(tiny_config):
    model = build_model(tiny_config)
    with pytest.raises(ValueError, match="dynamic cache layers"):
        model.generate(_ids(batch=1, length=3), max_new_tokens=2, do_sample=False, cache_implementation="static")


@torch.no_grad()
@pytest.mark.parametrize("q_len", [1, 4])
def test_absorbed_path_equals_plain_path(tiny_config, q_len):
    model = build_model(tiny_config)
    ids = _ids(length=12 + q_len)
    results = {}
    for path in ("plain", "absorbed"):
        model.set_attention_path(path)
        cache = output_cache(model(ids[:, :12]))
        results[path] = model(ids[:, 12:], cache=cache).logits
    model.set_attention_path("auto")
    plain, absorbed = results["plain"], results["absorbed"]
    assert ((absorbed - plain).norm() / plain.norm()).item() < 1e-5


@torch.no_grad()
def test_absorbed_prefill_equals_plain_prefill(tiny_config):
    """The absorbed path also handles a causal block of queries with no past (mask built internally)."""
    model = build_model(tiny_config)
    ids = _ids(length=9)
    model.set_attention_path("plain")
    plain = model(ids, use_cache=False).logits
    model.set_attention_path("absorbed")
    absorbed = model(ids, use_cache=False).logits
    model.set_attention_path("auto")
    assert ((absorbed - plain).norm() / plain.norm()).item() < 1e-5


@torch.no_grad()
def test_cache_bytes_per_token_match_formula(tiny_config):
    model = build_model(tiny_config)
    batch, length = 3, 7
    cache = output_cache(model(_ids(batch=batch, length=length)))
    per_layer = tiny_config.kv_cache_elements_per_layer
    if isinstance(tiny_config, GHLAConfig):
        # GHLA: the keys slot holds the rotated key heads, the values slot the latent value (no padding).
        cfg = tiny_config
        assert per_layer == cfg.num_key_heads * cfg.head_dim + cfg.latent_dim
        assert tuple(cache.layers[0].keys.shape) == (batch, cfg.num_key_heads, length, cfg.head_dim)
        assert tuple(cache.layers[0].values.shape) == (batch, 1, length, cfg.latent_dim)
    elif isinstance(tiny_config, GTAConfig):
        assert per_layer == tiny_config.num_key_value_heads * tiny_config.head_dim + tiny_config.rope_dim
        assert tuple(cache.layers[0].state.shape) == (batch, tiny_config.num_key_value_heads, length, 16)
    else:
        assert per_layer == tiny_config.num_latent_heads * tiny_config.kv_lora_rank + tiny_config.qk_rope_head_dim
        assert tuple(cache.layers[0].state.shape) == (
            batch,
            tiny_config.num_latent_heads,
            length,
            tiny_config.kv_lora_rank,
        )
    assert tuple(cache.layers[0].rope_key.shape)[1] == 1  # stored once, not per head
    expected_elements = per_layer * tiny_config.num_hidden_layers
    assert cache.elements_per_token() == expected_elements
    assert cache.bytes_per_token() == expected_elements * 4  # fp32
    assert cache.nbytes() == expected_elements * 4 * batch * length


@torch.no_grad()
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gta_cache_is_smaller_than_gqa_by_expected_ratio(groups):
    head_dim, rope_dim = 16, 8
    gta = build_model(gta_config(num_key_value_heads=groups, head_dim=head_dim, rope_dim=rope_dim))
    llama_cfg = LlamaConfig(**BASE, num_key_value_heads=groups, head_dim=head_dim)
    llama = LlamaForCausalLM(llama_cfg).eval()
    ids = _ids(batch=2, length=9)
    gta_cache = output_cache(gta(ids))
    gqa_cache = output_cache(llama(ids, use_cache=True))
    gqa_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in gqa_cache.layers)
    ratio = gta_cache.nbytes() / gqa_bytes
    assert ratio == pytest.approx((groups * head_dim + rope_dim) / (2 * groups * head_dim))
    assert ratio < 1


@torch.no_grad()
def test_gla_cache_ratio_against_gqa():
    cfg = gla_config(num_latent_heads=2, kv_lora_rank=16, qk_rope_head_dim=8)
    gla = build_model(cfg)
    llama = LlamaForCausalLM(LlamaConfig(**BASE, num_key_value_heads=2, head_dim=16)).eval()
    ids = _ids(batch=1, length=5)
    gqa_cache = output_cache(llama(ids, use_cache=True))
    gqa_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in gqa_cache.layers)
    assert output_cache(gla(ids)).nbytes() / gqa_bytes == pytest.approx((2 * 16 + 8) / (2 * 2 * 16))


@torch.no_grad()
def test_left_padding_matches_rows_run_alone(tiny_config):
    model = build_model(tiny_config)
    long_row, short_row = _ids(batch=1, length=9, seed=3), _ids(batch=1, length=5, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([long_row, torch.cat([pad, short_row], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=position_ids).logits
    alone_long = model(long_row).logits
    alone_short = model(short_row).logits
    assert (logits[0] - alone_long[0]).abs().max().item() < 1e-4
    assert (logits[1, 4:] - alone_short[0]).abs().max().item() < 1e-4

    # Generation with the padded batch gives each row what it gives alone.
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    alone = model.generate(short_row, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out[1, 4:], alone[0])


def test_rope_freqs_are_per_layer_buffers_saved_with_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(gla_config())
    with torch.no_grad():
        model.model.layers[1].self_attn.rope_freqs.copy_(torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[1].self_attn.rope_freqs, torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    assert not torch.equal(loaded.model.layers[0].self_attn.rope_freqs, loaded.model.layers[1].self_attn.rope_freqs)


def test_fresh_model_uses_standard_rope_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = LLAMA3_ROPE
    model = build_model(gta_config(rope_dim=16, rope_parameters=rope))
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](
        LlamaConfig(**BASE, head_dim=16, rope_parameters=rope), "cpu"
    )
    assert torch.allclose(model.model.layers[0].self_attn.rope_freqs, reference.float(), rtol=1e-6)

    linear = build_model(gta_config(rope_dim=16, rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0)))
    plain = build_model(gta_config(rope_dim=16))
    assert torch.allclose(
        linear.model.layers[0].self_attn.rope_freqs, plain.model.layers[0].self_attn.rope_freqs / 4.0
    )


@pytest.mark.parametrize(
    "factory, field",
    [
        (lambda: gta_config(rope_dim=7), "rope_dim"),
        (lambda: gta_config(rope_dim=32), "rope_dim"),
        (lambda: gta_config(num_key_value_heads=3), "num_key_value_heads"),
        (lambda: gla_config(num_latent_heads=3), "num_latent_heads"),
        (lambda: gla_config(qk_rope_head_dim=9), "qk_rope_head_dim"),
        (lambda: gla_config(kv_lora_rank=0), "kv_lora_rank"),
        (lambda: gla_config(qk_nope_head_dim=-1), "qk_nope_head_dim"),
        (lambda: gla_config(v_head_dim=0), "v_head_dim"),
        (lambda: gta_config(rope_parameters=dict(rope_type="yarn", rope_theta=1e4)), "rope_type"),
        (lambda: gta_config(hidden_size=0), "hidden_size"),
        (lambda: ghla_config(num_maps=3), "num_maps"),
        (lambda: ghla_config(num_maps=2, num_key_heads=4), "num_key_heads"),
        (lambda: ghla_config(head_dim=7), "head_dim"),
        (lambda: ghla_config(latent_dim=0), "latent_dim"),
        (lambda: ghla_config(v_head_dim=0), "v_head_dim"),
    ],
)
def test_bad_configs_name_the_field(factory, field):
    with pytest.raises(ValueError, match=field):
        factory()


def test_gla_allows_wide_rope_and_empty_nope():
    cfg = gla_config(qk_nope_head_dim=0, qk_rope_head_dim=64)
    assert cfg.qk_head_dim == 64
    assert isinstance(cfg, GLAConfig)


@torch.no_grad()
def test_dynamic_rope_changes_frequencies_past_trained_length():
    model = build_model(
        gta_config(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0))
    )
    short = model(_ids(batch=1, length=8)).logits
    assert torch.isfinite(short).all()
    from gtakit.models.common_gtakit import dynamic_rope_freqs

    base = model.model.layers[0].self_attn.rope_freqs
    scaled = dynamic_rope_freqs(base, model.config.rope_parameters, seq_len=64, max_positions=16)
    assert torch.all(scaled[1:] < base[1:]) and scaled[0] == base[0]


def test_casting_the_model_keeps_rope_frequencies_in_float32():
    model = build_model(gla_config())
    freqs = model.model.layers[0].self_attn.rope_freqs.clone()
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        buffer = model.model.layers[0].self_attn.rope_freqs
        assert buffer.dtype == torch.float32 and torch.equal(buffer, freqs)
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    with torch.no_grad():
        assert torch.isfinite(model.to(torch.bfloat16)(_ids(batch=1, length=5)).logits.float()).all()


@torch.no_grad()
def test_hidden_states_and_loss_like_transformers(tiny_config):
    model = build_model(tiny_config)
    ids = _ids(batch=2, length=7)
    out = model(ids, labels=ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)


LONG_FORWARD = """
import json, resource, sys, torch
import gtakit
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model(**json.loads(sys.argv[1]))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config).eval()
ids = torch.randint(3, 97, (1, int(sys.argv[2])))
with torch.no_grad():
    model(ids[:, :64], use_cache=False)  # warm up allocators and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits = model(ids, use_cache=False, logits_to_keep=1).logits
    assert torch.isfinite(logits).all()
print(json.dumps({"growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


@pytest.mark.parametrize("name", ["gla2-no-nope-wide-rope", "ghla-m2-k1", "mla-narrow-value", "gta-g2"])
def test_long_forward_memory_is_linear_in_the_sequence(name, tmp_path):
    """A causal forward of 8192 tokens stays far below what one layer's 4 x T x T fp32 score matrix takes (1 GiB):
    prefill runs SDPA's fused kernels also when the key and value widths differ (GLA/MLA, GHLA)."""
    import json
    import subprocess
    import sys

    from conftest import TINY_CONFIGS

    config = gla_config(num_latent_heads=1, kv_lora_rank=32, qk_nope_head_dim=16) if name == "mla-narrow-value" \
        else TINY_CONFIGS[name]()
    value_width = getattr(config, "latent_dim", None) or getattr(config, "v_head_dim", None) or config.head_dim
    assert (config.qk_head_dim == value_width) == (name == "gta-g2")  # the others need the padded fused path
    fields = dict(config.to_dict(), model_type=config.model_type)
    result = subprocess.run([sys.executable, "-c", LONG_FORWARD, json.dumps(fields), "8192"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 400, f"{name}: a 8192-token forward grew the peak memory by {growth:.0f} MB"
