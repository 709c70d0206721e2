"""Sliding-window sources (Mistral's window, Qwen2's sliding layers): the family's own masks and sliding cache
layers carry the window, so full-budget conversions stay exact past it, cached and generated."""

from __future__ import annotations

import pytest
import torch
from sources import VOCAB, random_text, write_source
from transformers.cache_utils import DynamicSlidingWindowLayer

from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible
from gtakit.models import output_cache

pytestmark = pytest.mark.slow  # end-to-end conversions of sliding-window families


SLIDING = ["mistral-sliding", "qwen2-sliding-layer"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sliding")
    text = root / "calib.txt"
    text.write_text(random_text(3000))
    return root, {name: write_source(name, root / name) for name in SLIDING}, text


def _ids(batch=2, length=24, seed=3):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("name", SLIDING)
@pytest.mark.parametrize("target", ["gla", "mla"])
def test_full_budget_is_exact_past_the_window(sources, name, target):
    root, models, _ = sources
    source = models[name]
    options = ConvertOptions(target=target, kv_rank="full", rope_dim="full")
    model, _ = convert_in_memory(open_convertible(root / name), options)
    ids = _ids()
    assert (model(ids).logits - source(ids).logits).abs().max().item() < 1e-4

    # Cached decode, one token at a time past the window (absorbed path over the sliding cache layers).
    out = model(ids[:, :4])
    cache, pieces = output_cache(out), [out.logits]
    for t in range(4, ids.shape[1]):
        pieces.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert (torch.cat(pieces, dim=1) - source(ids).logits).abs().max().item() < 1e-4
    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)

    prompt = ids[:1, :6]
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, **kwargs), source.generate(prompt, **kwargs))


@torch.no_grad()
def test_calibration_applies_the_window(sources):
    """Calibrated (aware) statistics come from the family's windowed attention; at full budget the conversion is
    exact whatever the statistics, and at a reduced one it runs and stays finite."""
    root, models, text = sources
    source = open_convertible(root / "mistral-sliding")
    exact, _ = convert_in_memory(source, ConvertOptions(target="mla", kv_rank="full", rope_dim="full",
                                                        calib=str(text), calib_seq_len=64, calib_tokens=2048))
    ids = _ids()
    assert (exact(ids).logits - models["mistral-sliding"](ids).logits).abs().max().item() < 1e-4
    reduced, _ = convert_in_memory(source, ConvertOptions(target="gla", kv_rank=8, calib=str(text),
                                                          calib_seq_len=64, calib_tokens=2048))
    assert torch.isfinite(reduced(ids).logits).all()


def test_calibration_mask_is_the_familys_window():
    from transformers import MistralConfig, Qwen2Config

    from gtakit.families import family_of

    mistral = MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, sliding_window=3)
    mask = family_of(mistral).calibration_mask(mistral, 0, 6, "cpu")[0, 0]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    qwen2 = Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, use_sliding_window=True,
                        sliding_window=3, max_window_layers=1)
    assert family_of(qwen2).calibration_mask(qwen2, 0, 6, "cpu") is None  # layer 0 is a full-attention layer
    assert family_of(qwen2).calibration_mask(qwen2, 1, 6, "cpu") is not None
