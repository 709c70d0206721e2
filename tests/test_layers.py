"""Per-layer conversion: layers kept in source form and different widths per layer, in config, cache and report."""

from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file
from sources import write_source
from test_save_load import run_without_gtakit
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible

pytestmark = pytest.mark.slow  # end-to-end conversions with per-layer forms, loaded without gtakit


LAYERS = ["0:source", "1:kv-rank=16,rope-dim=8", "2-:kv_rank=32"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model = write_source("llama-3-layers", root / "src")
    return root, model


def _convert(root, *extra):
    out = root / "out"
    args = ["convert", root / "src", "--to", "gla", "-o", out, "--quiet", "--force"]
    for spec in LAYERS:
        args += ["--layer", spec]
    result = CliRunner().invoke(app, [str(a) for a in [*args, *extra]])
    assert result.exit_code == 0, result.output
    return out


def test_first_layer_in_source_form_others_at_two_widths_load_without_gtakit(source, tmp_path):
    root, src_model = source
    out = _convert(root)
    config = json.loads((out / "config.json").read_text())
    layers = config["gtakit_layers"]
    assert [spec["form"] for spec in layers] == ["source", "gla", "gla"]
    assert (layers[1]["kv_lora_rank"], layers[1]["qk_rope_head_dim"]) == (16, 8)
    assert layers[2]["kv_lora_rank"] == 32 and len(layers[2]["rope_index"]) == layers[2]["qk_rope_head_dim"] // 2

    # The kept layer's attention and every non-attention weight are the source's bytes under the source's names.
    written = load_file(out / "model.safetensors")
    source_state = src_model.state_dict()
    for name, tensor in written.items():
        if ".self_attn." not in name or name.startswith("model.layers.0."):
            assert torch.equal(tensor, source_state[name]), name

    # The report and the cache agree on the per-layer widths.
    report = json.loads((out / "conversion.json").read_text())
    per_layer = [2 * 2 * 16, 2 * 16 + 8, 2 * 32 + layers[2]["qk_rope_head_dim"]]
    assert report["kv_cache"]["elements_per_token_per_layer"] == per_layer
    assert report["kv_cache"]["elements_per_token_after"] == sum(per_layer)

    # Loaded where gtakit cannot be imported, it computes what the in-memory conversion computes.
    options = ConvertOptions(target="gla", layers=LAYERS)
    in_memory, _ = convert_in_memory(open_convertible(root / "src"), options)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    remote = run_without_gtakit(out, ids, tmp_path)
    with torch.no_grad():
        expected = in_memory(ids).logits
        generated = in_memory.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.allclose(remote["logits"], expected, atol=1e-5)
    assert torch.equal(remote["generated"], generated)
    assert remote["cache_elements"] == sum(per_layer)


@torch.no_grad()
def test_full_budget_layers_next_to_source_layers_are_exact(source):
    root, src_model = source
    options = ConvertOptions(target="gla", kv_rank="full", rope_dim="full", layers=["1:source"])
    model, report = convert_in_memory(open_convertible(root / "src"), options)
    assert [entry["form"] for entry in report["layers"]] == ["gla", "source", "gla"]
    ids = torch.randint(3, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model(ids).logits, src_model(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    "layers, fragment",
    [
        (["3:source"], "outside 0-2"),
        (["1:kvrank=3"], "not KEY=VALUE"),
        (["x:source"], "RANGE"),
        (["1:groups=2"], "--groups does not apply to --to gla (--layer 1)"),
        (["0-:source"], "nothing would be converted"),
        (["2:to=gta,kv_rank=8"], "--kv-rank does not apply to --to gta (--layer 2)"),
    ],
)
def test_bad_layer_settings_are_refused_in_one_line(source, layers, fragment):
    root, _ = source
    args = ["convert", str(root / "src"), "-o", str(root / "never")]
    for spec in layers:
        args += ["--layer", spec]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert not (root / "never").exists()


def test_mixed_forms_per_layer(source):
    root, _ = source
    options = ConvertOptions(target="gla", layers=["0:to=gta", "2:to=ghla"])
    model, report = convert_in_memory(open_convertible(root / "src"), options)
    assert [spec["form"] for spec in model.config.gtakit_layers] == ["gta", "gla", "ghla"]
    with torch.no_grad():
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_format_constraints_are_honoured_by_planning(source):
    """A format that needs something no chosen form provides is refused before any work."""
    from gtakit.convert.plan import plan_conversion
    from gtakit.errors import GtakitError
    from gtakit.families import family_of

    root, _ = source
    src = open_convertible(root / "src")
    options = ConvertOptions(target="mla", layers=["0:source"])
    plan_conversion(src, family_of(src.config), options, frozenset())
    with pytest.raises(GtakitError, match="needs a-hypothetical-need, which a layer kept in source form \\(layer 0\\)"):
        plan_conversion(src, family_of(src.config), options, frozenset({"a-hypothetical-need"}), "some-format")
    gta = ConvertOptions(target="gta")
    with pytest.raises(GtakitError, match="needs global-rope-grid, which --to gta \\(layer 0\\) cannot provide; do X"):
        plan_conversion(src, family_of(src.config), gta, frozenset({"global-rope-grid"}), "some-format", "do X")
