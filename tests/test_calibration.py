"""Calibration statistics and the calibration-driven initialisations (pca, aware)."""

from __future__ import annotations

import pytest
import torch
from sources import VOCAB, random_text
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert.calibration import LayerwiseCalibrator, calibration_ids
from gtakit.io.source import open_source

runner = CliRunner()


@pytest.mark.parametrize("batch_tokens", [512, 8192], ids=["4-micro-batches", "1-micro-batch"])
@torch.no_grad()
def test_layer_statistics_match_a_direct_forward(calib_setup, batch_tokens, monkeypatch):
    from gtakit.convert import calibration

    root, models, text = calib_setup
    monkeypatch.setitem(calibration.MICRO_BATCH_TOKENS, "cpu", batch_tokens)
    source = open_source(str(root / "llama-gqa-llama3rope"))
    ids = calibration_ids(source, str(text), num_tokens=2048, seq_len=256)
    calibrator = LayerwiseCalibrator(source, ids)
    assert calibrator.rows_per_batch == max(1, batch_tokens // 256)
    model = models["llama-gqa-llama3rope"]
    hidden = model(ids, output_hidden_states=True).hidden_states
    for index, layer in enumerate(model.model.layers):
        stats = calibrator(index)
        x = layer.input_layernorm(hidden[index]).reshape(-1, 64).double()
        expected = x.T @ x / x.shape[0]
        assert stats.tokens == ids.numel()
        assert torch.allclose(stats.input_cov, expected, rtol=1e-4, atol=1e-6)
        assert stats.rotation_cos.shape == (4, 8) and stats.rotation_cos.abs().max() <= 1 + 1e-9
        assert torch.allclose(stats.rotation_cos[:, -1], torch.ones(4, dtype=torch.float64), atol=0.05)


def test_calibration_is_sequential(calib_setup):
    root, _, text = calib_setup
    source = open_source(str(root / "llama-gqa-llama3rope"))
    calibrator = LayerwiseCalibrator(source, calibration_ids(source, str(text), 1024, 128))
    with pytest.raises(RuntimeError, match="sequential"):
        calibrator(1)


@pytest.mark.parametrize("init", ["pca", "aware"])
def test_full_budget_calibrated_conversion_is_exact_cli(calib_setup, tmp_path, init):
    root, models, text = calib_setup
    name = "llama-gqa-llama3rope"
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(root / name), "--to", "gla", "-o", str(out), "--kv-rank", "full",
                                 "--rope-dim", "full", "--init", init, "--calib", str(text), "--calib-seq-len",
                                 "128", "--quiet"])
    assert result.exit_code == 0, result.output
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (converted(ids).logits - models[name](ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("init", ["pca", "aware"])
@pytest.mark.parametrize("target", ["gla", "mla"])
def test_full_budget_calibrated_conversion_is_exact_with_biases(calib_setup, init, target):
    from gtakit.convert import ConvertOptions
    from gtakit.convert.pipeline import convert_in_memory

    root, models, _ = calib_setup
    source = open_source(str(root / "qwen2-bias"))
    ids = torch.randint(3, VOCAB, (8, 128), generator=torch.Generator().manual_seed(9))
    calibrator = LayerwiseCalibrator(source, ids)
    options = ConvertOptions(target=target, kv_rank="full", rope_dim="full", init=init)
    converted, _ = convert_in_memory(source, options, stats_for_layer=calibrator)
    test_ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (converted(test_ids).logits - models["qwen2-bias"](test_ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("target", ["gta", "gla", "mla"])
def test_calibrated_reduced_budget_has_lower_reconstruction_error_than_weight_only(calib_setup, tmp_path, target):
    """On the calibration distribution, PCA compresses keys and values better than weight-only SVD."""
    import json

    root, _, text = calib_setup
    errors = {}
    for init in ("svd", "pca"):
        out = tmp_path / init
        args = ["convert", str(root / "llama-gqa-llama3rope"), "--to", target, "-o", str(out), "--init", init,
                "--calib", str(text), "--calib-seq-len", "128", "--quiet"]
        if target == "gta":
            args += ["--gta-state", "value"]
        else:
            args += ["--kv-rank", "12", "--rope-dim", "full"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "conversion.json").read_text())
        errors[init] = report["layers"]
    assert report["settings"]["init"] == "pca"
    if target != "gta":  # the decomposition is the same; only the metric differs, so PCA measures lower error
        assert all(e["value_rel_error"] <= s["value_rel_error"] + 1e-9 for e, s in zip(errors["pca"], errors["svd"]))


def test_auto_init_uses_aware_with_calibration(calib_setup, tmp_path):
    import json

    root, _, text = calib_setup
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(root / "llama-gqa-llama3rope"), "--to", "gta", "-o", str(out), "--calib",
                                 str(text), "--calib-seq-len", "128", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "conversion.json").read_text())["settings"]["init"] == "aware"


def test_calibration_needs_text(calib_setup, tmp_path):
    root, _, _ = calib_setup
    result = runner.invoke(app, ["convert", str(root / "qwen2-bias"), "-o", str(tmp_path / "o"), "--init", "pca"])
    assert result.exit_code == 2 and "--calib" in result.output
    result = runner.invoke(app, ["convert", str(root / "qwen2-bias"), "-o", str(tmp_path / "o"), "--calib",
                                 str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "does not exist" in result.output
    if not torch.cuda.is_available():
        text = tmp_path / "calib.txt"
        text.write_text(random_text(2000))
        result = runner.invoke(app, ["convert", str(root / "llama-gqa-llama3rope"), "-o", str(tmp_path / "o"),
                                     "--calib", str(text), "--calib-device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "o").exists()


def test_calibration_text_from_a_datasets_name(monkeypatch):
    """A non-file --calib is read with datasets.load_dataset (streamed); the Hub is faked here."""
    import sys
    import types

    from gtakit.convert.calibration import load_calibration_text

    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first document"}, {"text": "second one"}, {"text": "never read"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text = load_calibration_text("org/corpus:raw:validation", max_chars=20)
    assert calls == [("org/corpus", "raw", "validation", True)]
    assert text == "first document\n\nsecond one"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibration_on_gpu_matches_cpu(calib_setup):
    root, _, text = calib_setup
    source = open_source(str(root / "llama-gqa-llama3rope"))
    ids = calibration_ids(source, str(text), num_tokens=2048, seq_len=256)
    on_cpu = LayerwiseCalibrator(source, ids, device="cpu")
    on_gpu = LayerwiseCalibrator(source, ids, device="cuda")
    for index in range(2):
        a, b = on_cpu(index), on_gpu(index)
        assert b.input_cov.device.type == "cpu"
        assert torch.allclose(a.input_cov, b.input_cov, rtol=1e-3, atol=1e-5)
        assert torch.allclose(a.rotation_cos, b.rotation_cos, atol=1e-3)


def test_rotation_moments_are_the_attention_weighted_mean_over_distances():
    """The GEMM form equals the definition: sum over query i, key j of p_ij cos((i - j) theta), per head."""
    from types import SimpleNamespace

    from gtakit.convert.calibration import attention_rotation_moments

    heads, length, dim = 2, 12, 4
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, length, (heads + 1) * dim, generator=generator)
    family = SimpleNamespace(
        rotated_queries_keys=lambda layer, x, cos_sin, config: (
            x[..., : heads * dim].reshape(1, length, heads, dim).transpose(1, 2), x[..., None, heads * dim :].transpose(1, 2)),
        attention_scale=lambda config: 0.5)
    inv_freq = torch.tensor([1.0, 0.1])
    window = torch.ones(length, length, dtype=torch.bool).tril().triu(-4)[None, None]
    for mask in (None, window):
        mean_cos, mean_sin = attention_rotation_moments(family, None, x, None, None, inv_freq, mask)
        q, k = family.rotated_queries_keys(None, x, None, None)
        allowed = torch.ones(length, length, dtype=torch.bool).tril() if mask is None else mask[0, 0]
        probs = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf")), dim=-1)[0]
        distance = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).double()
        for h in range(heads):
            for f, theta in enumerate(inv_freq.double()):
                expected_cos = (probs[h].double() * (distance * theta).cos()).sum() / length
                expected_sin = (probs[h].double() * (distance * theta).sin()).sum() / length
                assert abs(float(mean_cos[h, f] - expected_cos)) < 1e-6
                assert abs(float(mean_sin[h, f] - expected_sin)) < 1e-6


@torch.no_grad()
def test_an_advancing_pairs_pass_gives_the_next_layer_the_same_inputs(calib_setup, monkeypatch):
    from gtakit.convert import calibration

    monkeypatch.setitem(calibration.MICRO_BATCH_TOKENS, "cpu", 512)  # several micro-batches
    root, _, text = calib_setup
    source = open_source(str(root / "llama-gqa-llama3rope"))
    ids = calibration_ids(source, str(text), num_tokens=2048, seq_len=256)
    plain, advancing, broken = (LayerwiseCalibrator(source, ids) for _ in range(3))
    for calibrator in (plain, advancing, broken):
        calibrator(0)
    expected = list(plain.attention_pairs(0))
    got = list(advancing.attention_pairs(0, advance=True))  # kept: no argument may change as the pass advances
    assert len(got) == 4
    for (args, kwargs, target), (args2, kwargs2, target2) in zip(expected, got):
        assert torch.equal(target, target2)
        inputs, inputs2 = (list(a) + [v for v in k.values() if isinstance(v, torch.Tensor)] for a, k in
                           ((args, kwargs), (args2, kwargs2)))
        assert all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    with pytest.raises(RuntimeError, match="replaced by its outputs"):
        next(advancing.attention_pairs(0))
    with pytest.raises(RuntimeError, match="replaced by its outputs"):
        advancing.use_attention(0, torch.nn.Identity())
    assert torch.equal(advancing(1).input_cov, plain(1).input_cov)
    next(broken.attention_pairs(0, advance=True))  # one micro-batch of four, then abandoned
    with pytest.raises(RuntimeError, match="stopped early"):
        broken(1)
