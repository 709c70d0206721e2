"""`--format deepseek-v3`: a gtakit MLA written as a native DeepSeek-V3 checkpoint, checked in transformers' own
`DeepseekV3ForCausalLM` (loaded where gtakit cannot be imported, without remote code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from sources import VOCAB, random_text, write_source
from test_save_load import HIDE_GTAKIT
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible
from gtakit.convert.export import export_model
from gtakit.formats.deepseek_v3 import grid_stride
from gtakit.forms.rope import rope_grid, select_shared_rope

pytestmark = pytest.mark.slow  # end-to-end conversions and exports loaded natively


# Measured on the tiny random Llama below (refit variant, 2,048 fitting tokens): attention output error 0.07-0.10
# per layer, KL 2e-5 nats/token; random weights give latents of very uneven norm and no input direction of
# nearly constant projection for the ballast coordinate (benchmarks/RESULTS.md has SmolLM2's).
REFIT_ATTENTION_BOUND = 0.2
REFIT_KL_BOUND = 1e-3

NATIVE_LOAD = HIDE_GTAKIT + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code
    assert type(model).__name__ == "DeepseekV3ForCausalLM", type(model)
    ids = torch.load(ids_path, weights_only=True)
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "generated": out}, out_path)
    """
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    (root / "calib.txt").write_text(random_text(4000))
    for name in ("llama-gqa-llama3rope", "qwen2-bias", "mistral-gqa"):
        write_source(name, root / name)
    return root


def _ids(batch=2, length=20, seed=5):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _convert(source, out, *extra):
    args = ["convert", source, "--to", "mla", "-o", out, "--quiet", "--calib", source.parent / "calib.txt",
            "--calib-seq-len", "64", "--calib-tokens", "2048", *extra]
    if "deepseek-v3" in extra:
        args += ["--norm-tokens", "2048"]
    return CliRunner().invoke(app, [str(a) for a in args])


def _native(folder, ids, tmp_path) -> dict:
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(NATIVE_LOAD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(folder), str(tmp_path / "ids.pt"),
                             str(tmp_path / "out.pt")], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


def _gtakit_mla(source, **options):
    options = {"target": "mla", "init": "svd", "rope_grid": "fastest", **options}
    return convert_in_memory(open_convertible(source), ConvertOptions(**options))[0]


@torch.no_grad()
def test_anchor_export_loads_natively_and_equals_gtakit_mla(sources, tmp_path):
    source, out = sources / "llama-gqa-llama3rope", tmp_path / "ds"
    result = _convert(source, out, "--format", "deepseek-v3", "--latent-norm", "anchor", "--init", "svd",
                      "--eval-text", source.parent / "calib.txt", "--eval-tokens", "256", "--eval-window", "64")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "conversion.json").read_text())["evaluation"]
    assert abs(evaluation["perplexity"] - evaluation["gtakit_mla_perplexity"]) < 1e-3 * evaluation["perplexity"]
    assert "gtakit MLA" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_key_value_heads"] == config["num_attention_heads"]
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] and config["rope_interleave"] is True
    assert config["rope_parameters"]["rope_type"] == "llama3"  # the source's scaling, on the grid's base
    assert not list(out.glob("*.py")) and (out / "tokenizer.json").exists() and (out / "README.md").exists()
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] if (
        out / "model.safetensors.index.json").exists() else {}
    assert not any("rope_freqs" in name or "k_up_proj" in name for name in weights)
    export = json.loads((out / "conversion.json").read_text())["export"]
    assert export["kl_per_token"] < 1e-9 and export["logits_max_abs_diff"] < 1e-3
    assert max(layer["attention_rel_error"] for layer in export["layers"]) < 1e-4

    ids = _ids()
    reference = _gtakit_mla(source)
    native = _native(out, ids, tmp_path)
    assert (native["logits"] - reference(ids).logits).abs().max() < 1e-3
    generated = reference.generate(ids[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(native["generated"], generated)


@torch.no_grad()
@pytest.mark.parametrize("grid", ["spread", "fastest"])
def test_anchor_export_carries_qwen2_biases_exactly(sources, tmp_path, grid):
    """Query, RoPE-key and value biases: exact in transformers through the anchor coordinates."""
    model = _gtakit_mla(sources / "qwen2-bias", rope_dim=8, rope_grid=grid)
    options = ConvertOptions(target="mla", output_format="deepseek-v3", latent_norm="anchor")
    export = export_model(model, tmp_path, _ids(5, 64), options, torch.float32)
    assert export["q_lora_rank"] == model.config.hidden_size + 1  # the query bias needs the low-rank path
    assert export["rope_grid_stride"] == (2 if grid == "spread" else 1)
    assert export["kl_per_token"] < 1e-9 and export["logits_max_abs_diff"] < 1e-3


@torch.no_grad()
def test_refit_export_has_no_biases_and_a_measured_error(sources, tmp_path):
    model = _gtakit_mla(sources / "llama-gqa-llama3rope", rope_dim=8)
    options = ConvertOptions(target="mla", output_format="deepseek-v3", latent_norm="refit")
    export = export_model(model, tmp_path, _ids(33, 64), options, torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention_bias"] is False and config["q_lora_rank"] is None
    assert config["kv_lora_rank"] == model.config.gtakit_layers[0]["kv_lora_rank"] + 1  # + the ballast coordinate
    assert config["n_routed_experts"] == 2 and config["first_k_dense_replace"] == config["num_hidden_layers"]
    assert 0 < max(layer["attention_rel_error"] for layer in export["layers"]) < REFIT_ATTENTION_BOUND
    assert export["kl_per_token"] < REFIT_KL_BOUND
    assert "llama.cpp" in export["engines"] and "vLLM" in export["engines"]


def test_export_of_a_converted_folder(sources, tmp_path):
    """Convert (and, in practice, uptrain) in gtakit's form on the global grid, export at the end."""
    folder = tmp_path / "mla"
    assert _convert(sources / "mistral-gqa", folder, "--rope-grid", "fastest", "--init", "svd").exit_code == 0
    calib = str(sources / "calib.txt")
    result = CliRunner().invoke(app, ["export", str(folder), "-o", str(tmp_path / "ds"), "--calib", calib,
                                      "--norm-tokens", "2048", "--calib-seq-len", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ds" / "conversion.json").read_text())
    assert report["format"] == "deepseek-v3" and report["export"]["rope_grid_stride"] == 1
    assert "trust_remote_code" not in (tmp_path / "ds" / "README.md").read_text().split("## Usage")[1]


@pytest.mark.parametrize("args, message", [
    (["--to", "gla"], "needs one-latent, which --to gla (layer 0) cannot provide; DeepSeek-V3 attention is MLA"),
    (["--to", "gta"], "which --to gta (layer 0) cannot provide; DeepSeek-V3 attention is MLA: use --to mla"),
    (["--to", "ghla"], "which --to ghla (layer 0) cannot provide"),
    (["--layer", "1:source"], "a layer kept in source form (layer 1) cannot provide"),
    (["--rope-grid", "none"], "needs one global RoPE table: use --rope-grid spread or fastest"),
    (["--rope-dim", "full"], "at most 16; lower --rope-dim"),
    (["--latent-norm", "exact"], "--latent-norm must be one of refit, anchor"),
])
def test_what_the_format_cannot_hold_is_refused_in_one_line(sources, tmp_path, args, message):
    result = _convert(sources / "llama-gqa-llama3rope", tmp_path / "out", "--format", "deepseek-v3", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_refusals_outside_the_format(sources, tmp_path):
    source = str(sources / "llama-gqa-llama3rope")
    runner = CliRunner()
    no_calib = runner.invoke(app, ["convert", source, "--to", "mla", "--format", "deepseek-v3", "-o",
                                   str(tmp_path / "a")])
    assert no_calib.exit_code == 2 and "pass --calib FILE" in no_calib.output
    wrong_format = _convert(sources / "llama-gqa-llama3rope", tmp_path / "b", "--latent-norm", "anchor")
    assert wrong_format.exit_code == 2 and "--latent-norm apply to --format deepseek-v3 only" in wrong_format.output
    folder = tmp_path / "free"
    assert _convert(sources / "llama-gqa-llama3rope", folder, "--init", "svd").exit_code == 0
    off_grid = runner.invoke(app, ["export", str(folder), "-o", str(tmp_path / "c"), "--calib",
                                   str(sources / "calib.txt")])
    assert off_grid.exit_code == 2 and "--rope-grid fastest" in off_grid.output


def test_grid_selection_keeps_one_component_per_grid_frequency(sources):
    from gtakit.families import family_of

    src = open_convertible(sources / "llama-gqa-llama3rope")
    attn = family_of(src.config).read_attention(src.weights, src.config, 0)
    for kind, expected in (("spread", [0, 2, 4, 6]), ("fastest", [0, 1, 2, 3])):
        grid = rope_grid(attn.head_dim, 4, kind)
        assert grid == expected and grid_stride(grid) == (2 if kind == "spread" else 1)
        selection = select_shared_rope(attn, 4, grid=grid)
        assert selection.index == grid
    assert grid_stride([0, 2, 5]) is None and grid_stride([1, 2]) is None
