"""Refinement after the closed-form conversion: the output refit and sequential calibration."""

from __future__ import annotations

import pytest
import torch
from sources import VOCAB

from gtakit.convert import ConvertOptions
from gtakit.convert.calibration import LayerwiseCalibrator, calibration_ids
from gtakit.convert.pipeline import convert_in_memory
from gtakit.convert.refine import OutputMoments, output_moments, refit_output_weight
from gtakit.errors import GtakitError
from gtakit.io.source import open_source


def calibrator(root, name, text):
    source = open_source(str(root / name))
    if name == "qwen2-bias":  # Qwen2's tokenizer class ignores the tiny word-level vocabulary: random ids
        ids = torch.randint(3, VOCAB, (16, 128), generator=torch.Generator().manual_seed(9))
    else:
        ids = calibration_ids(source, str(text), 2048, 128)
    return source, LayerwiseCalibrator(source, ids)


# GHLA's lossless case (tied queries) is checked with the default refit in test_ghla.py.
FULL = {"gla": dict(kv_rank="full", rope_dim="full"), "mla": dict(kv_rank="full", rope_dim="full")}


@pytest.mark.parametrize("target", sorted(FULL))
@pytest.mark.parametrize("name", ["llama-gqa-llama3rope", "qwen2-bias"])
def test_refit_and_sequential_keep_a_full_budget_conversion_exact(calib_setup, target, name):
    root, models, text = calib_setup
    source, live = calibrator(root, name, text)
    options = ConvertOptions(target=target, init="aware", refit="output", sequential=True, **FULL[target])
    converted, report = convert_in_memory(source, options, stats_for_layer=live)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (converted(ids).logits - models[name](ids).logits).abs().max().item() < 1e-4
    assert all(layer["output_rel_error"] < 1e-8 for layer in report["layers"])


@pytest.mark.parametrize("target,widths", [("gta", {}), ("gla", {"kv_rank": 8}), ("mla", {"kv_rank": 12}),
                                           ("ghla", {"latent_dim": 16})])
def test_output_refit_lowers_the_output_error_on_calibration_text(calib_setup, target, widths):
    root, _, text = calib_setup
    source, live = calibrator(root, "llama-gqa-llama3rope", text)
    options = ConvertOptions(target=target, init="aware", refit="output", **widths)
    _, report = convert_in_memory(source, options, stats_for_layer=live)
    for layer in report["layers"]:
        assert 0 <= layer["output_rel_error"] < layer["output_rel_error_before_refit"]
    assert options.refit == "output"


def test_sequential_calibration_sees_the_converted_layers(calib_setup):
    """With a lossy layer 0, layer 1's input moment differs from the source's; the source path is unchanged."""
    root, _, text = calib_setup
    moments = {}
    for sequential in (False, True):
        source, live = calibrator(root, "llama-gqa-llama3rope", text)
        seen = []

        class Recording(LayerwiseCalibrator):
            def __call__(self, index):
                stats = super().__call__(index)
                seen.append(stats.input_cov)
                return stats

        live.__class__ = Recording
        options = ConvertOptions(target="mla", kv_rank=8, init="aware", refit="none", sequential=sequential)
        convert_in_memory(source, options, stats_for_layer=live)
        moments[sequential] = seen
    assert torch.equal(moments[False][0], moments[True][0])
    assert not torch.allclose(moments[False][1], moments[True][1], rtol=1e-3)


def test_refinement_needs_live_calibration(calib_setup):
    root, _, text = calib_setup
    source, live = calibrator(root, "llama-gqa-llama3rope", text)
    stats = [live(i) for i in range(source.config.num_hidden_layers)]
    # Precomputed statistics: auto resolves to no refit; asking for one is refused in one line.
    options = ConvertOptions(target="mla", kv_rank=8, init="aware")
    _, report = convert_in_memory(source, options, stats_for_layer=lambda i: stats[i])
    assert report["options"].refit == "none" and options.refit == "auto"  # resolved in a copy
    for bad in (dict(refit="output"), dict(sequential=True)):
        with pytest.raises(GtakitError, match="--calib"):
            convert_in_memory(source, ConvertOptions(target="mla", kv_rank=8, init="aware", **bad),
                              stats_for_layer=lambda i: stats[i])
    with pytest.raises(GtakitError, match="--refit-tokens must be at least 0"):
        convert_in_memory(source, ConvertOptions(target="mla", refit_tokens=-1), stats_for_layer=live)
    with pytest.raises(GtakitError, match="--refit-ridge must be positive"):
        convert_in_memory(source, ConvertOptions(target="mla", refit_ridge=0.0), stats_for_layer=live)
    with pytest.raises(GtakitError, match="--refit must be one of"):
        convert_in_memory(source, ConvertOptions(target="mla", refit="weights"), stats_for_layer=None)


def test_output_refit_solves_the_least_squares_problem():
    torch.manual_seed(0)
    u = torch.randn(500, 6, dtype=torch.float64)
    true = torch.randn(4, 6, dtype=torch.float64)
    y = u @ true.T + 0.01 * torch.randn(500, 4, dtype=torch.float64)
    moments = OutputMoments(u.T @ u, y.T @ u, float((y**2).sum()))
    fitted = refit_output_weight(moments, torch.zeros(4, 6, dtype=torch.float64))
    least_squares = torch.linalg.lstsq(u, y).solution.T
    assert torch.allclose(fitted, least_squares, atol=1e-3)
    assert moments.error(fitted) < moments.error(torch.zeros(4, 6, dtype=torch.float64))



def test_refit_on_the_first_tokens_consumes_every_pair():
    """`refit_tokens`: the converted attention runs on the first micro-batches only, yet the pass is consumed to
    its end (it advances the calibrator)."""
    o_proj = torch.nn.Linear(6, 4, bias=False)
    calls = []

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = o_proj

        def forward(self, x):
            calls.append(x.shape)
            return self.o_proj(x)

    consumed = []

    def pairs():
        for i in range(5):
            consumed.append(i)
            x = torch.randn(2, 100, 6, generator=torch.Generator().manual_seed(i))
            yield (x,), {}, torch.randn(2, 100, 4)

    limited = output_moments(Attention(), pairs(), tokens=300)
    assert len(calls) == 2 and consumed == [0, 1, 2, 3, 4]  # 2 x 200 tokens reach 300
    calls.clear()
    consumed.clear()
    full = output_moments(Attention(), pairs())
    assert len(calls) == 5 and full.target_energy > limited.target_energy


@pytest.mark.parametrize("target", sorted(FULL))
def test_refit_on_fewer_tokens_stays_exact_and_still_lowers_the_error(calib_setup, target):
    root, models, text = calib_setup
    source, live = calibrator(root, "llama-gqa-llama3rope", text)
    options = ConvertOptions(target=target, init="aware", refit="output", refit_tokens=512, **FULL[target])
    converted, _ = convert_in_memory(source, options, stats_for_layer=live)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (converted(ids).logits - models["llama-gqa-llama3rope"](ids).logits).abs().max().item() < 1e-4
    source, live = calibrator(root, "llama-gqa-llama3rope", text)
    options = ConvertOptions(target=target, init="aware", refit="output", refit_tokens=512, kv_rank=8)
    _, report = convert_in_memory(source, options, stats_for_layer=live)
    for layer in report["layers"]:
        assert 0 <= layer["output_rel_error"] < layer["output_rel_error_before_refit"]

def test_layer_local_fitting_lowers_its_loss_and_is_reproducible(calib_setup):
    root, _, text = calib_setup
    results = []
    for _ in range(2):
        source, live = calibrator(root, "llama-gqa-llama3rope", text)
        options = ConvertOptions(target="mla", kv_rank=8, init="aware", refit="none", refine_steps=5,
                                 refine_tokens=512)
        model, report = convert_in_memory(source, options, stats_for_layer=live)
        results.append((model.state_dict(), report["layers"]))
    for layer in results[0][1]:
        assert layer["refine_loss_last"] < layer["refine_loss_first"]
    assert results[0][1] == results[1][1]
    assert all(torch.equal(results[0][0][name], results[1][0][name]) for name in results[0][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refinement_on_gpu_matches_cpu(calib_setup):
    root, _, text = calib_setup
    reports = []
    for device in ("cpu", "cuda"):
        source = open_source(str(root / "llama-gqa-llama3rope"))
        live = LayerwiseCalibrator(source, calibration_ids(source, str(text), 2048, 128), device=device)
        options = ConvertOptions(target="mla", kv_rank=8, init="aware", refit="output", refine_steps=3,
                                 refine_tokens=512)
        reports.append(convert_in_memory(source, options, stats_for_layer=live)[1]["layers"])
    for cpu, gpu in zip(*reports):
        assert gpu["output_rel_error"] == pytest.approx(cpu["output_rel_error"], rel=1e-2, abs=1e-4)


def test_auto_ridge_is_chosen_on_held_out_sequences():
    """A direction the fit's sequences never excite but a held-out one does: a small ridge leaves its o_proj
    column free (here it fits noise), and the held-out error picks a larger one."""
    from gtakit.convert.refine import Holdout, OutputMoments, _accumulate, choose_ridge

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    total = OutputMoments(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64), 0.0)
    held = OutputMoments(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64), 0.0)
    holdout = Holdout.for_sequences(4, 32)
    for sequence in range(4):
        u = torch.randn(32, 6, generator=g, dtype=torch.float64)
        u[:, 5] *= 1e-4 if sequence != 3 else 1.0  # barely excited except in the held-out sequence
        y = u @ weight.T
        y[:, :] += 1e-3 * torch.randn(32, 1, generator=g, dtype=torch.float64) / (u[:, 5:6].abs() + 1e-4) * 1e-4
        _accumulate(total, u.float(), y.float())
        if holdout.mask(torch.tensor([sequence * 32]))[0]:
            _accumulate(held, u.float(), y.float())
    total.held_out = held
    assert held.tokens == 32 and Holdout.for_sequences(3, 32).every == 2 and Holdout.for_sequences(1, 32) is None
    assert choose_ridge(total, weight) >= 1e-2
    total.held_out = None
    assert choose_ridge(total, weight) == 0.1  # nothing held out: the fallback
