"""Unit tests of each form's layer conversion on a random source attention, without a model or a file: exact at
full budget, the cache the spec's formula says, and the error falling as the form gets wider."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from gtakit.convert.methods import svd_metric
from gtakit.convert import ConvertOptions
from gtakit.families.base import SourceAttention, SourceShape
from gtakit.forms import FORMS, TensorNames
from gtakit.forms.base import check_tensors
from gtakit.models import CompressedKVCache

HIDDEN, HEAD_DIM, LENGTH = 32, 8, 12


def source_attention(heads: int, kv_heads: int, seed: int = 0, bias: bool = False) -> SourceAttention:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5

    q, kv = heads * HEAD_DIM, kv_heads * HEAD_DIM
    return SourceAttention(
        wq=rand(q, HIDDEN), wk=rand(kv, HIDDEN), wv=rand(kv, HIDDEN), wo=rand(HIDDEN, q),
        bq=rand(1, q)[0] if bias else None, bk=rand(1, kv)[0] if bias else None, bv=None, bo=None,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM,
        inv_freq=1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)))


def family_config(src: SourceAttention) -> LlamaConfig:
    return LlamaConfig(hidden_size=HIDDEN, num_attention_heads=src.num_heads, num_key_value_heads=src.num_kv_heads,
                       head_dim=HEAD_DIM, intermediate_size=64, num_hidden_layers=1, vocab_size=16,
                       attention_bias=src.bq is not None)


def cos_sin(src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(LENGTH, dtype=torch.float64)[:, None] * src.inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)[None]  # [1, L, d]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def source_output(src: SourceAttention, x: torch.Tensor) -> torch.Tensor:
    """The source attention in plain PyTorch: RoPE, grouped keys and values, causal softmax."""
    cos, sin = cos_sin(src)

    def heads(w, b, n):
        y = x @ w.T + (b if b is not None else 0)
        return y.view(1, LENGTH, n, HEAD_DIM).transpose(1, 2)

    q = rotate(heads(src.wq, src.bq, src.num_heads), cos[:, None], sin[:, None])
    k = rotate(heads(src.wk, src.bk, src.num_kv_heads), cos[:, None], sin[:, None])
    v = heads(src.wv, src.bv, src.num_kv_heads)
    per = src.num_heads // src.num_kv_heads
    k, v = k.repeat_interleave(per, dim=1), v.repeat_interleave(per, dim=1)
    scores = q @ k.transpose(-1, -2) * HEAD_DIM**-0.5
    scores = scores.masked_fill(torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, LENGTH, -1)
    return out @ src.wo.T


def convert(src: SourceAttention, target: str, **widths) -> tuple[torch.nn.Module, dict, dict]:
    """Plan a layer of `target` at `widths` (the `gtakit convert` options), convert it, and load the result into
    the model's module (float64). Returns (module, spec, metrics)."""
    form = FORMS[target]
    config = family_config(src)
    shape = _shape(src)
    options = _options(**widths)
    spec = form.plan(shape, options)
    meta = form.meta_module(config, spec)
    converted = form.convert_layer(src, spec, svd_metric(src, None), None, options, TensorNames(meta))
    check_tensors(converted.tensors, meta)
    spec = {**spec, **converted.spec_updates}
    module = form.model_class(config, spec, 0, "torch").double()
    module.load_state_dict(converted.tensors, strict=True)
    return module.eval(), spec, converted.metrics


def _shape(src: SourceAttention) -> SourceShape:
    return SourceShape(num_heads=src.num_heads, num_kv_heads=src.num_kv_heads, head_dim=HEAD_DIM,
                       hidden_size=HIDDEN, num_layers=1, has_qk_bias=src.bq is not None, has_o_bias=False)


def _options(**widths) -> ConvertOptions:
    return ConvertOptions(**{"rope_grid": "none", **widths})  # the value `auto` resolves to for a gtakit folder


def run(module: torch.nn.Module, src: SourceAttention, x: torch.Tensor, cache=None) -> torch.Tensor:
    with torch.no_grad():
        return module(x, position_embeddings=cos_sin(src), attention_mask=None, past_key_values=cache)[0]


def relative_error(module, src, x) -> float:
    expected = source_output(src, x)
    return float((run(module, src, x) - expected).norm() / expected.norm())


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, LENGTH, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


FULL_BUDGET = [  # (form, source heads / KV heads, widths that make the form lossless)
    pytest.param("gta", (4, 1), dict(groups=1, rope_dim="full"), id="gta-mqa"),
    pytest.param("gla", (4, 2), dict(latent_heads=2, kv_rank="full", rope_dim="full"), id="gla2-gqa"),
    pytest.param("mla", (4, 2), dict(kv_rank="full", rope_dim="full"), id="mla-gqa"),
    pytest.param("mla", (4, 4), dict(kv_rank="full", rope_dim="full"), id="mla-mha"),
    pytest.param("ghla", (4, 2), dict(maps=4, key_heads=2, latent_dim="full", rope_dim="full"), id="ghla-gqa"),
]


@pytest.mark.parametrize("bias", [False, True], ids=["", "qk-bias"])
@pytest.mark.parametrize("target, heads, widths", FULL_BUDGET)
def test_full_budget_is_exact(target, heads, widths, bias):
    src = source_attention(*heads, bias=bias)
    module, _, _ = convert(src, target, **widths)
    assert relative_error(module, src, inputs()) < 1e-10


@pytest.mark.parametrize("target, heads, widths", [
    ("gta", (4, 2), dict(groups=2)),
    ("gla", (4, 2), dict(latent_heads=2, kv_rank=6, rope_dim=4)),
    ("mla", (4, 2), dict(kv_rank=12, rope_dim=6)),
    ("ghla", (4, 2), dict(maps=2, key_heads=1, latent_dim=10, rope_dim=8)),
])
def test_cache_holds_what_the_spec_formula_says(target, heads, widths):
    src = source_attention(*heads)
    module, spec, _ = convert(src, target, **widths)
    formula = FORMS[target].spec_type.from_dict(spec, family_config(src)).cache_elements()
    cache = CompressedKVCache(num_hidden_layers=1)
    run(module, src, inputs(), cache)
    assert cache.elements_per_token() == formula
    assert formula < 2 * src.num_kv_heads * HEAD_DIM  # smaller than the source's keys and values


@pytest.mark.parametrize("target, heads, fixed, option, widths, metric", [
    ("gta", (4, 1), {"groups": 1}, "rope_dim", [2, 4, 6, 8], "key_rel_error"),
    ("mla", (4, 2), {"rope_dim": 4}, "kv_rank", [4, 8, 16, 32], "value_rel_error"),
    ("gla", (4, 2), {"rope_dim": 4}, "kv_rank", [2, 4, 8, 16], "value_rel_error"),
    ("ghla", (4, 2), {"rope_dim": 8, "maps": 4, "key_heads": 2}, "latent_dim", [2, 4, 8, 16], "value_rel_error"),
])
def test_error_falls_as_the_form_widens(target, heads, fixed, option, widths, metric):
    """The reported error of the part that widens never rises, and the output error at the widest setting is
    less than half the narrowest's."""
    src = source_attention(*heads)
    x = inputs()
    errors, reported = [], []
    for width in widths:
        module, _, metrics = convert(src, target, **fixed, **{option: width})
        errors.append(relative_error(module, src, x))
        reported.append(metrics[metric])
    assert all(b <= a + 1e-12 for a, b in zip(reported, reported[1:])), reported
    assert errors[-1] < errors[0] / 2, errors


def test_a_tensor_the_model_lacks_cannot_be_named():
    src = source_attention(4, 2)
    form = FORMS["mla"]
    names = TensorNames(form.meta_module(family_config(src), form.plan(_shape(src), _options(target="mla"))))
    assert names.kv_down_proj.weight == "kv_down_proj.weight"
    with pytest.raises(AttributeError, match="kv_proj"):
        names.kv_proj.weight  # noqa: B018 - GTA's name, not MLA's
    with pytest.raises(AttributeError, match="q_proj.bias"):
        names.q_proj.bias  # noqa: B018 - a source without biases gives a module without them


def test_converted_tensors_must_match_the_module():
    src = source_attention(4, 2)
    module, spec, _ = convert(src, "mla", kv_rank=8)
    form = FORMS["mla"]
    meta = form.meta_module(family_config(src), spec)
    tensors = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    check_tensors(tensors, meta)
    tensors["kv_down_proj.weight"] = tensors["kv_down_proj.weight"][:-1]
    with pytest.raises(RuntimeError, match="kv_down_proj.weight"):
        check_tensors(tensors, meta)


def test_register_refuses_a_pair_that_disagrees():
    from gtakit.forms import register
    from gtakit.forms.gta import GTAConverter
    from gtakit.models import GTAAttention

    class ReportsAnotherFormsField(GTAConverter):
        report_fields = ("num_latent_heads",)

    with pytest.raises(TypeError, match="num_latent_heads"):
        register(ReportsAnotherFormsField(), GTAAttention)

    class Unregistered(GTAAttention):
        pass

    with pytest.raises(TypeError, match="not the model side"):
        register(GTAConverter(), Unregistered)


def test_the_spec_refuses_unknown_fields_and_fills_its_defaults():
    src = source_attention(4, 2)
    spec_type = FORMS["mla"].spec_type
    with pytest.raises(ValueError, match="num_key_value_heads"):
        spec_type.from_dict({"form": "gla", "num_key_value_heads": 2}, family_config(src))
    with pytest.raises(ValueError, match="must divide"):
        spec_type.from_dict({"form": "gla", "num_latent_heads": 3}, family_config(src))
    spec = spec_type.from_dict({"form": "gla"}, family_config(src))
    assert (spec.kv_lora_rank, spec.qk_rope_head_dim, len(spec.rope_index)) == (4 * HEAD_DIM, HEAD_DIM // 2, 2)
    assert "softcap" not in spec.to_dict() and spec.to_dict()["form"] == "gla"


def test_the_flat_model_files_import_nothing_from_gtakit():
    """The model files are copied next to converted weights (trust_remote_code): the spec the converter shares
    with them lives on their side, and at import they need only each other (the Triton kernels are an optional
    import inside a function, guarded)."""
    import ast
    from pathlib import Path

    import gtakit.models

    for path in Path(gtakit.models.__file__).parent.glob("*_gtakit.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("gtakit"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("gtakit") for a in node.names), path.name


@pytest.mark.parametrize("tied_state", ["joint", "value"])
def test_every_gta_group_gets_the_tied_state_asked_for(tied_state):
    """Group 1 a copy of group 0: a conversion that treats every group alike gives both the same tied state."""
    src = source_attention(4, 2)
    d = HEAD_DIM
    src.wk[d:], src.wv[d:], src.wq[2 * d:] = src.wk[:d], src.wv[:d], src.wq[: 2 * d]
    module, _, _ = convert(src, "gta", groups=2, rope_dim=4, gta_state=tied_state)
    kv = module.kv_proj.weight
    assert torch.allclose(kv[:d], kv[d:], atol=1e-9)
    other, _, _ = convert(src, "gta", groups=2, rope_dim=4, gta_state={"joint": "value", "value": "joint"}[tied_state])
    assert not torch.allclose(kv[:d], other.kv_proj.weight[:d], atol=1e-6)  # the two states differ here
