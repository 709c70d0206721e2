"""Foundation guarantees of the GTA / GLA / MLA models and their compressed cache (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE, build_model, elements_per_layer, ghla_config, gla_config, gta_config, layer_spec
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from gtakit.models import CompressedKVCache, GtakitForCausalLM, output_cache
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
    assert isinstance(cache, DynamicCache)  # the family model's own cache holds the compressed tensors
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
        assert state[0, :, 0].numel() + second[0, :, 0].numel() == elements_per_layer(config)


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
    assert isinstance(cache, DynamicCache)
    assert output_cache(model(ids[:, 5:6], past_key_values=cache)) is cache
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         **{CACHE_FIELD: cache})
    assert output_cache(out) is cache and cache.get_seq_length() == 7 + 4 - 1
    fresh = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, fresh)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :2], cache=CompressedKVCache(config=tiny_config), past_key_values=cache)
    measured = CompressedKVCache(config=tiny_config)  # the measuring cache works as the caller's cache too
    model(ids[:, :5], **{CACHE_FIELD: measured})
    assert measured.elements_per_token() == model.kv_cache_elements_per_token()


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
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_latent_space_prefill_equals_upprojected_prefill(masked, softcap, monkeypatch):
    """GLA prefill in the latent space (c < n), with W_uk / W_uv multiplied into q_proj / o_proj or applied per
    token, is the same attention as with per-head keys and values; also with soft-capped scores (explicit
    attention, each latent copied to its block of heads)."""
    from gtakit.models import GLAAttention

    config = gla_config(kv_lora_rank=6, qk_nope_head_dim=12, num_latent_heads=2, attention_bias=True,
                        o_proj_bias=True)
    torch.manual_seed(0)
    attn = GLAAttention(config.source_config(), layer_spec(config), layer_idx=0).eval()
    attn.softcap = softcap
    batch, length = 2, 11
    hidden = torch.randn(batch, length, attn.config.hidden_size)
    angles = torch.randn(batch, length, attn.config.head_dim // 2)
    rotary = (torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin())
    mask = None
    if masked:  # left padding of the second row, as transformers' boolean 4-D mask
        mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
        mask[1, :, :, :3] = False
        mask[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    assert attn.latent_queries
    outputs = {}
    for fold in (True, False):
        attn.fold_weights = fold
        outputs[fold] = attn(hidden, rotary, attention_mask=mask)[0]
    monkeypatch.setattr(GLAAttention, "latent_queries", property(lambda self: False))
    upprojected = attn(hidden, rotary, attention_mask=mask)[0]
    for latent_space in outputs.values():
        assert (latent_space - upprojected).abs().max().item() < 1e-5
    assert outputs[True].shape == (batch, length, attn.config.hidden_size)


@torch.no_grad()
def test_gla_folds_weights_only_where_that_computes_the_same():
    """By default W_uk / W_uv are multiplied into q_proj / o_proj only at inference, for enough tokens, on plain
    projections: not while training (gradients), nor under a hook on o_proj (the output refit captures its input)."""
    from gtakit.models import GLAAttention

    config = gla_config(kv_lora_rank=6, qk_nope_head_dim=12, num_latent_heads=2)
    attn = GLAAttention(config.source_config(), layer_spec(config), layer_idx=0)
    assert attn.fold_weights is None and attn.folding_pays(4096, attn.nope_dim)
    assert not attn.folding_pays(1, attn.nope_dim)  # one decode token: folding costs more than it saves
    with torch.enable_grad():
        assert not attn.folding_pays(4096, attn.nope_dim)
    handle = attn.o_proj.register_forward_pre_hook(lambda module, args: None)
    assert not attn.folding_pays(4096, attn.nope_dim)
    handle.remove()
    assert attn.folding_pays(4096, attn.v_dim)


@torch.no_grad()
def test_ghla_per_head_prefill_equals_per_map_prefill():
    """GHLA with one map per head decodes values before attending; the output equals decoding after."""
    from gtakit.models import GHLAAttention

    config = ghla_config(num_maps=4, attention_bias=True)
    torch.manual_seed(0)
    attn = GHLAAttention(config.source_config(), layer_spec(config), layer_idx=0).eval()
    torch.nn.init.normal_(attn.value_decoder.weight, std=0.2)
    batch, length = 2, 10
    hidden = torch.randn(batch, length, config.hidden_size)
    query = torch.randn(batch, attn.num_maps, length, attn.head_dim)
    key = torch.randn(batch, attn.num_key_heads, length, attn.head_dim)
    latent = torch.randn(batch, 1, length, attn.latent_dim)
    per_head = attn.output(hidden, attn.per_head_attention(query, key, latent, None, length))
    per_map = attn.output(hidden, attn.latent_attention(query, key, latent, None, length))
    assert (per_head - per_map).abs().max().item() < 1e-5
    assert attn.plain_attention(query, key, latent, None, length).shape == (batch, length, attn.num_heads * attn.v_dim)

@torch.no_grad()
def test_cache_bytes_per_token_match_formula(tiny_config):
    model = build_model(tiny_config)
    batch, length = 3, 7
    cache = CompressedKVCache(config=tiny_config)
    model(_ids(batch=batch, length=length), **{CACHE_FIELD: cache})
    spec = layer_spec(tiny_config)
    per_layer = elements_per_layer(tiny_config)
    keys, values = cache.layers[0].keys, cache.layers[0].values
    if spec["form"] == "ghla":
        # GHLA: the keys slot holds the rotated key heads, the values slot the latent value (no padding).
        assert per_layer == spec["num_key_heads"] * spec["head_dim"] + spec["latent_dim"]
        assert tuple(keys.shape) == (batch, spec["num_key_heads"], length, spec["head_dim"])
        assert tuple(values.shape) == (batch, 1, length, spec["latent_dim"])
    elif spec["form"] == "gta":
        assert per_layer == spec["num_key_value_heads"] * spec["head_dim"] + spec["rope_dim"]
        assert tuple(keys.shape) == (batch, spec["num_key_value_heads"], length, 16)
        assert tuple(values.shape)[1] == 1  # the RoPE key is stored once, not per head
    else:
        assert per_layer == spec["num_latent_heads"] * spec["kv_lora_rank"] + spec["qk_rope_head_dim"]
        assert tuple(keys.shape) == (batch, spec["num_latent_heads"], length, spec["kv_lora_rank"])
        assert tuple(values.shape)[1] == 1
    expected_elements = per_layer * tiny_config.num_hidden_layers
    assert model.kv_cache_elements_per_token() == expected_elements
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
    gta_cache = CompressedKVCache(config=gta.config)
    gta(ids, **{CACHE_FIELD: gta_cache})
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
    gla_cache = CompressedKVCache(config=cfg)
    gla(ids, **{CACHE_FIELD: gla_cache})
    assert gla_cache.nbytes() / gqa_bytes == pytest.approx((2 * 16 + 8) / (2 * 2 * 16))


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


def test_rope_index_is_per_layer_and_saved_in_the_config(tmp_path):
    """Each layer picks its own subset of the family's RoPE frequencies; the choice lives in config.json."""
    from transformers import AutoModelForCausalLM

    config = gla_config()
    config.gtakit_layers[1]["rope_index"] = [7, 5, 3, 1]
    model = build_model(config)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.gtakit_layers[1]["rope_index"] == [7, 5, 3, 1]
    assert loaded.model.layers[0].self_attn.spec["rope_index"] == [0, 1, 2, 3]
    ids = _ids(batch=1, length=6)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


@torch.no_grad()
def test_attention_uses_the_familys_rotary_table():
    """cos/sin come from the family's own rotary embedding (scaling included), gathered at `rope_index`."""
    from sources import LLAMA3_ROPE

    model = build_model(gta_config(rope_parameters=LLAMA3_ROPE, rope_index=[6, 0, 3, 1]))
    attn = model.model.layers[0].self_attn
    x = torch.zeros(1, 40, BASE["hidden_size"])
    positions = torch.arange(40)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    picked_cos, picked_sin = attn.rope_cos_sin((cos, sin))
    inv_freq = model.model.rotary_emb.inv_freq[[6, 0, 3, 1]]
    angles = positions[0, :, None].float() * inv_freq
    assert torch.allclose(picked_cos[0, 0], torch.cat([angles.cos()] * 2, dim=-1), atol=1e-6)
    assert torch.allclose(picked_sin[0, 0], torch.cat([angles.sin()] * 2, dim=-1), atol=1e-6)


@pytest.mark.parametrize(
    "factory, field",
    [
        (lambda: gta_config(rope_dim=7), "rope_dim"),
        (lambda: gta_config(rope_dim=32), "rope_dim"),
        (lambda: gta_config(num_key_value_heads=3), "num_key_value_heads"),
        (lambda: gta_config(rope_index=[0, 1, 2, 8]), "rope_index"),
        (lambda: gta_config(rope_index=[0, 1]), "rope_index"),
        (lambda: gla_config(num_latent_heads=3), "num_latent_heads"),
        (lambda: gla_config(qk_rope_head_dim=9), "qk_rope_head_dim"),
        (lambda: gla_config(kv_lora_rank=0), "kv_lora_rank"),
        (lambda: gla_config(qk_nope_head_dim=-1), "qk_nope_head_dim"),
        (lambda: gla_config(v_head_dim=0), "v_head_dim"),
        (lambda: ghla_config(num_maps=3), "num_maps"),
        (lambda: ghla_config(num_maps=2, num_key_heads=4), "num_key_heads"),
        (lambda: ghla_config(head_dim=7), "head_dim"),
        (lambda: ghla_config(latent_dim=0), "latent_dim"),
        (lambda: ghla_config(v_head_dim=0), "v_head_dim"),
    ],
)
def test_bad_specs_name_the_field(factory, field):
    with pytest.raises(ValueError, match=field):
        GtakitForCausalLM(factory())


def test_config_refuses_a_layer_list_of_the_wrong_length():
    config = gta_config()
    with pytest.raises(ValueError, match="gtakit_layers"):
        type(config)(**{**config.to_dict(), "gtakit_layers": config.gtakit_layers[:1]})


def test_gla_allows_wide_rope_and_empty_nope():
    spec = layer_spec(gla_config(qk_nope_head_dim=0, qk_rope_head_dim=64))
    assert spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"] == 64
    assert len(spec["rope_index"]) == 32  # cycles over the source's 8 frequencies


def test_casting_the_model_keeps_it_working():
    model = build_model(gla_config())
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gla2-no-nope-wide-rope", "gla2-narrow-latent", "ghla-m2-k1", "ghla-m4-k1",
                                  "mla-narrow-value", "gta-g2"])
def test_long_forward_memory_is_linear_in_the_sequence(name, tmp_path):
    """A causal forward of 8192 tokens stays far below what one layer's 4 x T x T fp32 score matrix takes (1 GiB):
    prefill runs SDPA's fused kernels also when the key and value widths differ (GLA/MLA, GHLA)."""
    import json
    import subprocess
    import sys

    from conftest import TINY_CONFIGS

    config = gla_config(num_latent_heads=1, kv_lora_rank=32, qk_nope_head_dim=16) if name == "mla-narrow-value" \
        else TINY_CONFIGS[name]()
    spec = layer_spec(config)
    value_width = spec.get("latent_dim") or spec.get("v_head_dim") or spec["head_dim"]
    qk_width = spec["head_dim"] if "head_dim" in spec else spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"]
    assert (qk_width == value_width) == (name == "gta-g2")  # the others need the padded fused path
    fields = dict(config.to_dict(), model_type=config.model_type)
    result = subprocess.run([sys.executable, "-c", LONG_FORWARD, json.dumps(fields), "8192"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 400, f"{name}: a 8192-token forward grew the peak memory by {growth:.0f} MB"
