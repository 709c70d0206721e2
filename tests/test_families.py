"""Every supported source family x form: exact at full budget (GLA/MLA), cached decode equal to the full forward,
cache sizes equal to the formula at reduced budgets, and the QK-norm key scale modes."""

from __future__ import annotations

import pytest
import torch
from sources import VOCAB, random_text, write_source
from test_save_load import run_without_gtakit
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert_in_memory, open_convertible
from gtakit.errors import GtakitError
from gtakit.families import SUPPORTED_MODEL_TYPES, family_of
from gtakit.models import output_cache

pytestmark = pytest.mark.slow  # end-to-end conversions of a tiny checkpoint of every family


FAMILIES = ["llama-gqa-llama3rope", "mistral-sliding", "qwen2-bias", "phi3", "mixtral", "qwen2-moe", "smollm3", "gpt-neox", "gpt2",
            "qwen3", "qwen3-moe", "olmo2", "gemma2", "gemma3"]
QK_NORM = {"qwen3": 2, "qwen3-moe": 2, "olmo2": 1, "gemma3": 1}  # cached key scalars per token and layer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "calib.txt").write_text(random_text(3000))
    return root, {name: write_source(name, root / name) for name in FAMILIES}


def _ids(batch=2, length=24, seed=3):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _calibrated(root, name="", **options) -> ConvertOptions:
    if name in ("qwen2-bias", "qwen2-moe"):  # transformers maps qwen2 to its own tokenizer class, which ignores the tiny vocabulary
        return ConvertOptions(init="svd", **options)
    return ConvertOptions(calib=str(root / "calib.txt"), calib_seq_len=64, calib_tokens=2048, **options)


def _convert_folder(source, out, *widths):
    """`gtakit convert SOURCE --to mla WIDTHS -o OUT` (weight-only init: fast, deterministic)."""
    args = ["convert", source, "--to", "mla", *widths, "-o", out, "--quiet", "--init", "svd"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


def _stepwise_logits(model, ids, prefix=4):
    out = model(ids[:, :prefix])
    cache, pieces = output_cache(out), [out.logits]
    for t in range(prefix, ids.shape[1]):
        pieces.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(pieces, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("target", ["gla", "mla"])
def test_full_budget_is_exact(sources, name, target):
    root, models = sources
    source, ids = models[name], _ids()
    model, _ = convert_in_memory(open_convertible(root / name), _calibrated(root, name, target=target,
                                                                            kv_rank="full", rope_dim="full"))
    expected = source(ids).logits
    assert (model(ids).logits - expected).abs().max().item() < 1e-4
    assert (_stepwise_logits(model, ids) - expected).abs().max().item() < 1e-4  # absorbed decode, past windows

    # Left padding: the family's padding mask reaches the converted layers.
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    padded = (model(ids, attention_mask=mask).logits - source(ids, attention_mask=mask).logits)[mask.bool()]
    assert padded.abs().max().item() < 1e-4

    prompt = ids[:1, :6]
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, **kwargs), source.generate(prompt, **kwargs))


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("target", ["gta", "gla", "mla"])
def test_reduced_budget_cache_and_decode(sources, name, target):
    """At a reduced budget the cache holds what the formula says and cached decode equals the full forward
    (weight-only init: the calibration of every family runs in `test_full_budget_is_exact`)."""
    root, models = sources
    source = open_convertible(root / name)
    config = source.config
    widths = {"gta": dict(rope_dim=4), "gla": dict(kv_rank=8, rope_dim=4, latent_heads=2),
              "mla": dict(kv_rank=12, rope_dim=4)}[target]
    model, _ = convert_in_memory(source, ConvertOptions(target=target, init="svd", **widths))
    groups = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    family = family_of(config)
    per_layer = [{"gta": groups * head_dim, "gla": 2 * 8, "mla": 12}[target] + QK_NORM.get(name, 0)
                 + (4 if family.layer_has_rope(config, index) else 0)  # NoPE layers have no RoPE key
                 for index in range(config.num_hidden_layers)]
    assert model.kv_cache_elements_per_token() == sum(per_layer)
    ids = _ids()
    out = model(ids[:, :4])
    held = [layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in output_cache(out).layers]
    assert held == per_layer
    assert all(layer.keys.numel() and layer.values.numel() for layer in output_cache(out).layers)
    assert (_stepwise_logits(model, ids) - model(ids).logits).abs().max().item() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_mean_key_scale_needs_no_extra_cache_and_costs_accuracy(sources, name):
    root, models = sources
    source, ids = open_convertible(root / name), _ids()
    expected = models[name](ids).logits
    errors, sizes = {}, {}
    for mode in ("cached", "mean"):
        model, _ = convert_in_memory(source, _calibrated(root, target="mla", kv_rank="full", rope_dim="full",
                                                         key_norm=mode))
        errors[mode] = (model(ids).logits - expected).abs().max().item()
        sizes[mode] = model.kv_cache_elements_per_token()
        assert (_stepwise_logits(model, ids) - model(ids).logits).abs().max().item() < 1e-4
    layers = source.config.num_hidden_layers
    assert sizes["cached"] - sizes["mean"] == QK_NORM[name] * layers
    assert errors["cached"] < 1e-4 < errors["mean"] < 10


def test_mean_key_scale_without_calibration_is_refused(sources):
    root, _ = sources
    with pytest.raises(GtakitError, match="--key-norm mean"):
        convert_in_memory(open_convertible(root / "qwen3"), ConvertOptions(target="mla", init="svd",
                                                                           key_norm="mean"))


def test_qk_norm_refusals_name_the_way_out(sources):
    root, _ = sources
    with pytest.raises(GtakitError, match="--to ghla cannot convert QK-norm"):
        convert_in_memory(open_convertible(root / "qwen3"), ConvertOptions(target="ghla"))
    with pytest.raises(GtakitError, match="--key-norm must be one of"):
        convert_in_memory(open_convertible(root / "qwen3"), ConvertOptions(target="mla", key_norm="median"))


def test_unsupported_family_names_the_supported_list(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=48,
                             word_embed_proj_dim=32, vocab_size=VOCAB)).save_pretrained(tmp_path / "opt")
    with pytest.raises(GtakitError) as info:
        open_convertible(tmp_path / "opt")
    message = str(info.value)
    assert "\n" not in message and "'opt'" in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)


# One family per model-side path: eager attention and soft-capping, QK-norm with per-kind RoPE, layer_past and
# partial rotary, no positions at all, NoPE layers next to RoPE layers.
WITHOUT_GTAKIT = ["gemma2", "gemma3", "gpt-neox", "gpt2", "smollm3"]


@torch.no_grad()
@pytest.mark.parametrize("name", WITHOUT_GTAKIT)
def test_folder_loads_without_gtakit(sources, name, tmp_path):
    """The written folder computes, where gtakit cannot be imported (remote code only), what the in-memory
    conversion computes: logits, greedy tokens and the cache size."""
    root, _ = sources
    out = _convert_folder(root / name, tmp_path / "out", "--kv-rank", "20", "--rope-dim", "8")
    in_memory, _ = convert_in_memory(open_convertible(root / name),
                                     ConvertOptions(target="mla", kv_rank=20, rope_dim=8, init="svd"))
    ids = _ids(2, 11, seed=0)
    remote = run_without_gtakit(out, ids, tmp_path)
    assert torch.allclose(remote["logits"], in_memory(ids).logits, atol=1e-5)
    generated = in_memory.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(remote["generated"], generated)
    assert remote["cache_elements"] == in_memory.kv_cache_elements_per_token()


@torch.no_grad()
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_moe_folder_holds_fused_experts_and_loads(sources, name, tmp_path):
    """Per-expert checkpoint tensors are written in transformers' fused layout, so the folder loads as is."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, models = sources
    out = _convert_folder(root / name, tmp_path / "out", "--kv-rank", "full", "--rope-dim", "full")
    names = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            names |= set(handle.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in n or "block_sparse_moe" in n for n in names)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    assert (model(ids).logits - models[name](ids).logits).abs().max().item() < 1e-4
