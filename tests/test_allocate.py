"""Per-layer budget allocation (`--allocate error`): the knapsack, the measured errors, and the plan it makes."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from sources import random_text, token_ids, write_source
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible
from gtakit.convert.allocate import cheapest_allocation, layer_candidates
from gtakit.convert.plan import plan_conversion
from gtakit.errors import GtakitError
from gtakit.evaluate import load_model
from gtakit.families import family_of

WIDTHS = dict(target="gla", kv_rank=16, rope_dim=8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A 3-layer Llama, the same with layer 1's attention output 30x louder (far more sensitive to errors), and
    calibration text."""
    root = tmp_path_factory.mktemp("allocate")
    model = write_source("llama-3-layers", root / "plain")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(30.0)
    model.save_pretrained(root / "loud")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "plain" / name, root / "loud" / name)
    (root / "calib.txt").write_text(random_text(4000, seed=3))
    return root


def _options(root, **extra) -> ConvertOptions:
    return ConvertOptions(**WIDTHS, calib=str(root / "calib.txt"), calib_tokens=2048, calib_seq_len=128,
                          allocate="error", allocate_tokens=2048, **extra)


def test_cheapest_allocation_is_the_brute_force_optimum():
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        layers = 2 + trial % 3
        elements = [sorted(int(e) * 8 for e in torch.randint(1, 12, (3,), generator=generator)) for _ in range(layers)]
        errors = [torch.rand(3, generator=generator).tolist() for _ in range(layers)]
        budget = sum(row[0] for row in elements) + 8 * int(torch.randint(0, 6 * layers, (1,), generator=generator))
        feasible = [(sum(errors[l][k] for l, k in enumerate(pick)), pick)
                    for pick in itertools.product(range(3), repeat=layers)
                    if sum(elements[l][k] for l, k in enumerate(pick)) <= budget]
        picked = cheapest_allocation(elements, errors, budget)
        assert sum(elements[l][k] for l, k in enumerate(picked)) <= budget
        assert sum(errors[l][k] for l, k in enumerate(picked)) == pytest.approx(min(feasible)[0], abs=1e-12)
    with pytest.raises(GtakitError, match="fits the budget"):
        cheapest_allocation([[16, 24]], [[1.0, 0.0]], 8)


def test_the_sensitive_layer_gets_the_budget_and_the_total_stays(sources):
    plain, plain_report = convert_in_memory(open_convertible(sources / "plain"), _options(sources))
    loud, loud_report = convert_in_memory(open_convertible(sources / "loud"), _options(sources))
    budget = 3 * (2 * 16 + 8)
    for model, report in ((plain, plain_report), (loud, loud_report)):
        allocation = report["allocation"]
        assert allocation["budget_elements_per_token"] == budget
        assert model.kv_cache_elements_per_token() == allocation["elements_per_token"] <= budget
        assert allocation["error_allocated"] <= allocation["error_uniform"]
    # The loud layer's errors dominate: it gets more than its uniform share (or its own attention), others less.
    chosen = [layer["chosen"] for layer in loud_report["allocation"]["layers"]]
    widths = [spec.get("kv_lora_rank") for spec in loud.config.gtakit_layers]
    assert chosen[1] == "source" or widths[1] > 16, chosen
    assert widths[0] < 16 or widths[2] < 16, chosen
    assert loud_report["allocation"]["error_allocated"] < 0.5 * loud_report["allocation"]["error_uniform"]


def test_the_allocation_is_a_list_of_layer_settings_that_reproduces_it(sources, tmp_path):
    """Through the CLI: conversion.json holds the --layer settings; converting with them (no allocation) gives
    the same model, and the saved folder loads with the per-layer widths."""
    out = tmp_path / "out"
    args = ["convert", sources / "loud", "--to", "gla", "--kv-rank", "16", "--rope-dim", "8", "-o", out,
            "--calib", sources / "calib.txt", "--calib-tokens", "2048", "--calib-seq-len", "128",
            "--allocate", "error", "--allocate-tokens", "2048", "--quiet"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "conversion.json").read_text())
    settings = report["allocation"]["layer_settings"]
    assert settings and report["kv_cache"]["elements_per_token_after"] <= 3 * 40
    again = ConvertOptions(**WIDTHS, calib=str(sources / "calib.txt"), calib_tokens=2048, calib_seq_len=128,
                           layers=settings)
    expected, _ = convert_in_memory(open_convertible(sources / "loud"), again)
    loaded = load_model(str(out))[0]
    ids = token_ids(2, 20)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected(ids).logits, atol=1e-4)
    assert loaded.config.gtakit_layers == expected.config.gtakit_layers


def test_a_format_without_source_layers_never_keeps_one(sources):
    source = open_convertible(sources / "plain")
    plan = plan_conversion(source, family_of(source.config), ConvertOptions(**WIDTHS))
    with_source = [c.label for c, _ in layer_candidates(plan, 0, source_allowed=True)]
    without = [c.label for c, _ in layer_candidates(plan, 0, source_allowed=False)]
    assert "source" in with_source and "source" not in without
    assert "kv_rank=16" in without and "kv_rank=8" in without
    # Widths that cost as much as the source's own attention are not worth measuring when it may be kept.
    assert all(c.elements < plan.shape.cache_elements for c, p in layer_candidates(plan, 0, True) if p is not None)


@pytest.mark.parametrize("extra,fragment", [
    (dict(calib=None), "pass --calib"),
    (dict(allocate="lots"), "--allocate must be one of"),
    (dict(allocate_tokens=100), "at least 1024"),
])
def test_bad_allocation_settings_are_refused_in_one_line(sources, extra, fragment):
    options = _options(sources)
    for key, value in extra.items():
        setattr(options, key, value)
    if options.calib is None:
        options.init = "svd"
    with pytest.raises(GtakitError, match=fragment):
        convert_in_memory(open_convertible(sources / "plain"), options)


@pytest.mark.parametrize("widths", [dict(target="gta"), dict(target="mla", kv_rank=24, rope_dim=8),
                                    dict(target="ghla", latent_dim=16)], ids=["gta", "mla", "ghla"])
def test_every_form_with_a_width_setting_is_allocated_within_the_budget(sources, widths):
    options = ConvertOptions(**widths, calib=str(sources / "calib.txt"), calib_tokens=2048, calib_seq_len=128,
                             allocate="error", allocate_tokens=2048)
    model, report = convert_in_memory(open_convertible(sources / "loud"), options)
    allocation = report["allocation"]
    assert model.kv_cache_elements_per_token() == allocation["elements_per_token"]
    assert allocation["elements_per_token"] <= allocation["budget_elements_per_token"]
    assert allocation["error_allocated"] <= allocation["error_uniform"]
    assert all(len(layer["errors"]) >= 2 for layer in allocation["layers"])  # a choice was measured everywhere
