"""GHLA (grouped-head latent attention): conversion exactness, budgets, grouping, report and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from sources import COMMON, VOCAB, check_generates_with_cache, random_text, tiny_tokenizer, write_source
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.forms.ghla import GATE_BIAS, partition_heads
from gtakit.models import GHLAAttention, GtakitForCausalLM

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _ids(batch=2, length=24):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def _tie_queries(model, groups: list[list[int]]) -> None:
    """Give every head of each group the query weights (and bias) of the group's first head."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            proj = layer.self_attn.q_proj
            weight = proj.weight.view(cfg.num_attention_heads, d, -1)
            bias = proj.bias.view(cfg.num_attention_heads, d) if proj.bias is not None else None
            for group in groups:
                for head in group[1:]:
                    weight[head] = weight[group[0]]
                    if bias is not None:
                        bias[head] = bias[group[0]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny sources whose map groups have identical queries: GQA (groups = KV groups), Qwen2 with biases, and
    MQA with the identical heads interleaved (0, 2 and 1, 3), so grouping must find them."""
    root = tmp_path_factory.mktemp("ghla_sources")
    models = {}
    for name, groups in (("llama-gqa-llama3rope", [[0, 1], [2, 3]]), ("qwen2-bias", [[0, 1], [2, 3]])):
        model = write_source(name, root / name)
        _tie_queries(model, groups)
        model.save_pretrained(root / name, max_shard_size="60KB")
        models[name] = model
    torch.manual_seed(1)
    mqa = LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=1, head_dim=16)).eval()
    _tie_queries(mqa, [[0, 2], [1, 3]])
    mqa.save_pretrained(root / "llama-mqa")
    tiny_tokenizer().save_pretrained(root / "llama-mqa")
    models["llama-mqa"] = mqa
    text = root / "calib.txt"
    text.write_text(random_text(3000))
    return root, models, text


def _convert_with_random_calibration(folder, args: list[str]):
    from gtakit.convert import ConvertOptions
    from gtakit.convert.calibration import LayerwiseCalibrator
    from gtakit.convert.pipeline import convert_in_memory
    from gtakit.io.source import open_source

    flags = dict(zip(args[::2], args[1::2]))
    source = open_source(str(folder))
    ids = torch.randint(3, VOCAB, (8, 128), generator=torch.Generator().manual_seed(9))
    options = ConvertOptions(target="ghla", maps=int(flags["--maps"]), key_heads=int(flags["--key-heads"]),
                             latent_dim=flags["--latent-dim"], rope_dim=flags["--rope-dim"], init="aware")
    model, report = convert_in_memory(source, options, stats_for_layer=LayerwiseCalibrator(source, ids))
    return model, report["layers"]


LOSSLESS = [
    ("llama-gqa-llama3rope", ["--maps", "2", "--key-heads", "2"]),
    ("qwen2-bias", ["--maps", "2", "--key-heads", "2"]),
    ("llama-mqa", ["--maps", "2", "--key-heads", "1"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "calib"])
@pytest.mark.parametrize("name, args", LOSSLESS, ids=[name for name, _ in LOSSLESS])
def test_lossless_special_case_reproduces_source(sources, tmp_path, name, args, calibrated):
    root, models, text = sources
    out = tmp_path / "out"
    args = [*args, "--latent-dim", "full", "--rope-dim", "16"]
    if calibrated and name == "qwen2-bias":
        # Qwen2's tokenizer class ignores the tiny word-level vocabulary: calibrate on random ids in memory.
        converted, layers = _convert_with_random_calibration(root / name, args)
    else:
        calib = ["--calib", text, "--calib-tokens", "2048", "--calib-seq-len", "256"] if calibrated else []
        result = run_cli("convert", root / name, "--to", "ghla", *args, "-o", out, "--quiet", *calib)
        assert result.exit_code == 0, result.output
        layers = json.loads((out / "conversion.json").read_text())["layers"]
        converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = _ids()
    with torch.no_grad():
        expected = models[name](ids).logits
        got = converted(ids).logits
        assert (got - expected).abs().max().item() < 1e-4
        generated = converted.generate(ids[:1, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        reference = models[name].generate(ids[:1, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(generated, reference)
    for layer in layers:
        assert layer["value_rel_error"] < 1e-6 and layer["key_score_kept"] == pytest.approx(1.0)
        if calibrated:
            assert layer["map_agreement"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "args, per_layer",
    [
        ([], 16 + 16),  # defaults: one map per query head, one key head of d, latent = half the cache minus the key
        (["--maps", "1", "--rope-dim", "8", "--latent-dim", "12"], 8 + 12),
        (["--maps", "4", "--key-heads", "2", "--latent-dim", "8"], 2 * 16 + 8),
        (["--maps", "2", "--key-heads", "1", "--rope-dim", "full", "--latent-dim", "20"], 32 + 20),
    ],
)
def test_reduced_budget_loads_generates_and_has_requested_cache(sources, tmp_path, args, per_layer):
    root, _, text = sources
    out = tmp_path / "out"
    result = run_cli("convert", root / "llama-gqa-llama3rope", "--to", "ghla", *args, "-o", out, "--quiet",
                     "--calib", text, "--calib-tokens", "2048", "--calib-seq-len", "256")
    assert result.exit_code == 0, result.output
    report = check_generates_with_cache(out, per_layer)
    assert report["target"] == "ghla" and report["architecture"]["model_type"] == "gtakit"
    for layer in report["layers"]:
        assert 0 <= layer["value_rel_error"] <= 1 and 0 < layer["map_agreement"] <= 1 + 1e-9
    if not args:
        source_config = json.loads((root / "llama-gqa-llama3rope" / "config.json").read_text())
        assert report["architecture"]["num_maps"] == source_config["num_attention_heads"]
    assert "GHLA" in (out / "README.md").read_text()
    assert (out / "form_ghla.py").exists()


def test_converted_gate_starts_open_and_loads_natively(sources, tmp_path):
    root, _, _ = sources
    out = tmp_path / "out"
    assert run_cli("convert", root / "llama-mqa", "--to", "ghla", "-o", out, "--quiet").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # native: gtakit is imported here
    assert isinstance(model, GtakitForCausalLM)
    assert all(isinstance(layer.self_attn, GHLAAttention) for layer in model.model.layers)
    gate = model.model.layers[0].self_attn.gate_proj
    assert torch.all(gate.weight == 0) and torch.allclose(gate.bias, torch.full_like(gate.bias, GATE_BIAS))


@pytest.mark.slow
def test_fitted_query_is_used_and_measured(sources, tmp_path):
    root, _, text = sources
    out = tmp_path / "out"
    result = run_cli("convert", root / "llama-gqa-llama3rope", "--to", "ghla", "--maps", "1", "--ghla-query", "fit",
                     "-o", out, "--quiet", "--calib", text, "--calib-tokens", "2048", "--calib-seq-len", "256")
    assert result.exit_code == 0, result.output
    for layer in json.loads((out / "conversion.json").read_text())["layers"]:
        assert layer["fit_query_share"] == 1.0
        assert layer["map_agreement"] == layer["map_agreement_fit_query"]
        # Starts from the better of mean and central and descends the members' cross-entropy.
        best_closed_form = max(layer["map_agreement_mean_query"], layer["map_agreement_central_query"])
        assert layer["map_agreement_fit_query"] > best_closed_form - 0.01


def test_partition_prefers_agreeing_heads():
    sim = torch.tensor(
        [[1.0, 0.1, 0.9, 0.2], [0.1, 1.0, 0.3, 0.8], [0.9, 0.3, 1.0, 0.1], [0.2, 0.8, 0.1, 1.0]], dtype=torch.float64
    )
    groups = partition_heads([10, 11, 12, 13], sim, 2)
    assert sorted(groups) == [[10, 12], [11, 13]]


def _assert_clean_failure(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--to", "ghla", "--maps", "3"], ("--maps 3", "valid: [1, 2, 4]")),
        (["--to", "ghla", "--maps", "2", "--key-heads", "3"], ("--key-heads 3", "valid: [1, 2]")),
        (["--to", "ghla", "--maps", "1", "--key-heads", "2"], ("--key-heads 2", "valid: [1]")),
        (["--to", "ghla", "--latent-dim", "0"], ("--latent-dim 0", "between 1 and 32")),
        (["--to", "ghla", "--latent-dim", "x"], ("--latent-dim",)),
        (["--to", "ghla", "--rope-dim", "7"], ("--rope-dim 7", "even")),
        (["--to", "ghla", "--rope-dim", "40"], ("--rope-dim 40", "between 2 and 32")),
        (["--to", "ghla", "--kv-rank", "8"], ("does not apply to --to ghla",)),
        (["--to", "ghla", "--ghla-query", "best"], ("--ghla-query",)),
        (["--to", "gla", "--maps", "2"], ("--maps", "ghla only")),
        (["--to", "gta", "--latent-dim", "8"], ("--latent-dim", "ghla only")),
    ],
)
def test_bad_ghla_options(sources, tmp_path, args, fragments):
    root, _, _ = sources
    result = run_cli("convert", root / "llama-gqa-llama3rope", *args, "-o", tmp_path / "out")
    _assert_clean_failure(result, *fragments)
    assert not (tmp_path / "out").exists()
