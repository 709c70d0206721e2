"""The CPU decode path: in-place cache appends (a step writes its token instead of concatenating the cache) and the
absorbed attention read in chunks (online softmax)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, build_model, gla_config, gta_config
from transformers.cache_utils import DynamicCache

from gtakit.models import CACHE_FIELD, output_cache
from gtakit.models import attention_gtakit
from gtakit.models.cache_gtakit import GROWTH_TOKENS, append


def test_append_matches_concatenation_and_reuses_its_buffer():
    cache, reference = DynamicCache(), DynamicCache()
    torch.manual_seed(0)
    first = (torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 4))
    append(cache, 0, *first)
    reference.update(*first, 0)
    pointers = set()
    for _ in range(GROWTH_TOKENS + 10):
        step = (torch.randn(2, 3, 1, 8), torch.randn(2, 1, 1, 4))
        got = append(cache, 0, *step)
        expected = reference.update(*step, 0)
        pointers.add(got[0].data_ptr())
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len(pointers) == 2  # one buffer, grown once past GROWTH_TOKENS
    assert cache.get_seq_length() == reference.get_seq_length() == 5 + GROWTH_TOKENS + 10


def test_append_after_crop_and_batch_selection():
    cache, reference = DynamicCache(), DynamicCache()
    torch.manual_seed(1)
    for length in (6, 1, 1):
        step = (torch.randn(3, 2, length, 8), torch.randn(3, 1, length, 4))
        append(cache, 0, *step)
        reference.update(*step, 0)
    for current in (cache, reference):
        current.crop(-3)  # drop the last 3 of 8 tokens (a negative count works in every supported release)
    step = (torch.randn(3, 2, 1, 8), torch.randn(3, 1, 1, 4))
    assert all(torch.equal(a, b) for a, b in zip(append(cache, 0, *step), reference.update(*step, 0)))
    for current in (cache, reference):
        current.reorder_cache(torch.tensor([2, 0, 0]))
    step = (torch.randn(3, 2, 1, 8), torch.randn(3, 1, 1, 4))
    assert all(torch.equal(a, b) for a, b in zip(append(cache, 0, *step), reference.update(*step, 0)))


@pytest.mark.parametrize("make_config", [gta_config, lambda: gla_config(num_latent_heads=1, kv_lora_rank=32)],
                         ids=["gta", "mla"])
def test_decode_with_in_place_cache_equals_full_forward_and_beam_search_runs(make_config):
    model = build_model(make_config())
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for position in range(12, 20):
            out = model(ids[:, position : position + 1], use_cache=True, **{CACHE_FIELD: cache})
            steps.append(out.logits)
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        beams = model.generate(ids[:, :6], max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == (2, 12)


@pytest.mark.parametrize("name", ["gta-g2", "gta-g4-mha-bias", "mla", "gla2-bias", "gla4"])
def test_chunked_decode_equals_the_one_shot_softmax(name, monkeypatch):
    """Decode steps over a 40-token cache read in chunks of 4 tokens give the unchunked result. The chunked path
    serves what SDPA cannot fuse: soft-capped scores (set here) and cached key scales (QK-norm)."""
    config = TINY_CONFIGS[name]()
    for spec in config.gtakit_layers:
        spec["softcap"] = 50.0
    model = build_model(config)
    ids = torch.randint(3, model.config.vocab_size, (2, 44), generator=torch.Generator().manual_seed(4))

    def decode_logits() -> torch.Tensor:
        with torch.no_grad():
            out = model(ids[:, :40], use_cache=True)
            cache, steps = output_cache(out), []
            for position in range(40, 44):
                out = model(ids[:, position : position + 1], use_cache=True, **{CACHE_FIELD: cache})
                steps.append(out.logits)
        return torch.cat(steps, dim=1)

    one_shot = decode_logits()
    monkeypatch.setattr(attention_gtakit, "CHUNK_BYTES", 1)
    monkeypatch.setattr(attention_gtakit, "MIN_CHUNK_TOKENS", 4)
    calls = []
    chunked_path = attention_gtakit.online_softmax
    monkeypatch.setattr(attention_gtakit, "online_softmax", lambda *args: calls.append(1) or chunked_path(*args))
    chunked = decode_logits()
    assert torch.allclose(chunked, one_shot, atol=1e-5)
    assert len(calls) == 4 * model.config.num_hidden_layers  # every decode step of every layer went in chunks


@torch.no_grad()
@pytest.mark.parametrize("name", ["gta-g2", "gta-g1-mqa", "mla", "gla4", "gla2-no-nope-wide-rope"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_fused_absorbed_attention_equals_the_explicit_one(name, q_len):
    """The fused SDPA decode (heads as query rows, RoPE scores as a bias) against the explicit softmax path, which
    a key scale of ones selects without changing the scores; with the causal mask of a q_len block."""
    model = build_model(TINY_CONFIGS[name]())
    attn = model.model.layers[0].self_attn
    total, batch = 37, 2
    torch.manual_seed(1)
    hidden = torch.randn(batch, total, model.config.hidden_size)
    rotary = model.model.rotary_emb(hidden, torch.arange(total)[None].expand(batch, -1))
    cos, sin = attn.rope_cos_sin(rotary)
    query, state, rope_key = attn.project(hidden, cos, sin)
    query = query[:, :, -q_len:]
    mask = attention_gtakit.additive(None, q_len, total, query.device)
    fused = attn.absorbed_attention(query, state, rope_key, mask)
    ones = torch.ones(batch, attn.num_heads, total)
    explicit = attn.absorbed_attention(query, state, rope_key, mask, key_scale=ones)
    assert fused.shape == explicit.shape
    assert (fused - explicit).abs().max().item() < 1e-5
