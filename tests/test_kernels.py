"""Triton decode kernels (GTA, GLA/MLA) against their PyTorch references, and wired into the models.

Without CUDA the kernels run on CPU through Triton's interpreter: triton reads TRITON_INTERPRET when a kernel is
decorated, i.e. when `gtakit.kernels` is first imported, so it is set here before that import (the model files
import the kernels lazily, at first use). Shapes are tiny because the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from conftest import BASE, build_model, gla_config, gta_config  # noqa: E402

from gtakit.models import output_cache  # noqa: E402
from gtakit.kernels import (  # noqa: E402
    DecodeConfig,
    gla_decode,
    gta_decode,
    kernels_interpreted,
    naive_gla_decode,
    naive_gta_decode,
    to_paged,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and not kernels_interpreted():
    pytest.skip("gtakit.kernels was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Small blocks so that the tiny test caches still span several blocks and several splits.
SMALL = dict(block_m=16, block_n=16, num_warps=4, num_stages=2)

# form: (heads, groups, state width, rope width); GTA reads the first width - rope columns of the state as key.
FORMS = {
    "gta": (4, 2, 16, 8),
    "gla2": (4, 2, 24, 8),
    "mla": (4, 1, 32, 8),
    "gta-full-rope": (4, 2, 16, 16),  # no no-RoPE part: the state is only the value
    "gla-wide-rope": (4, 2, 24, 40),  # RoPE key wider than a power of two
}


def _inputs(form: str, batch: int, q_len: int, total: int, dtype: torch.dtype, seed: int = 0):
    heads, groups, width, rope = FORMS[form]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    state, rope_key = rand(batch, groups, total, width), rand(batch, 1, total, rope)
    if form.startswith("gta"):
        return (rand(batch, heads, q_len, width),), state, rope_key
    return (rand(batch, heads, q_len, width), rand(batch, heads, q_len, rope)), state, rope_key


def _ops(form: str):
    return (gta_decode, naive_gta_decode) if form.startswith("gta") else (gla_decode, naive_gla_decode)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _check(form, dtype, q_len, splits, paged, lengths, total=70, page_size=16):
    """Kernel vs reference on a ragged batch; the kernel's output buffer starts as NaN."""
    queries, state, rope_key = _inputs(form, len(lengths), q_len, total, dtype)
    op, naive = _ops(form)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = 0.3
    ref = naive(*queries, state, rope_key, scale=scale, lengths=lengths)
    cache = (state, rope_key)
    table = None
    if paged:
        pages, rope_pages, table = to_paged(
            state, rope_key, lengths, page_size=page_size, generator=torch.Generator().manual_seed(1), spare_pages=2
        )
        cache = (pages, rope_pages)
        # The reference reads the paged layout too (same signature), and agrees with the contiguous one.
        paged_ref = naive(*queries, *cache, scale=scale, lengths=lengths, block_table=table)
        assert rel_err(paged_ref, ref) < 1e-6
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE)
    result = op(*queries, *cache, scale=scale, lengths=lengths, block_table=table, out=out,
                config=DecodeConfig(num_splits=splits, **SMALL))
    assert result.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "kernel left output elements unwritten"
    assert rel_err(out, ref) < TOL[dtype]


def _fp32_cases() -> list:
    """Every (form, layout, query length, split) combination; the quick tier keeps the two corners per form (one
    query token, unsplit, contiguous; four tokens, three splits, paged), the rest run with the slow tests."""
    cases = []
    for splits in (1, 3):
        for q_len in (1, 4):
            for paged in (False, True):
                for form in ("gta", "gla2"):
                    corner = (splits, q_len, paged) in ((1, 1, False), (3, 4, True))
                    layout = "paged" if paged else "contiguous"
                    name = f"{'split3' if splits == 3 else 'unsplit'}-{q_len}-{layout}-{form}"
                    cases.append(pytest.param(form, paged, q_len, splits, id=name,
                                              marks=() if corner else pytest.mark.slow))
    return cases


@pytest.mark.parametrize("form, paged, q_len, splits", _fp32_cases())
def test_kernel_matches_reference_fp32(form, paged, q_len, splits):
    # Ragged: a full row, a row shorter than one block, a row ending mid-page; split 3 of the short row is empty.
    _check(form, torch.float32, q_len, splits, paged, lengths=[70, 9, 37])


@pytest.mark.parametrize("paged, q_len, splits", [(True, 4, 3), (False, 1, 1)])
def test_mla_matches_reference_fp32(paged, q_len, splits):
    # MLA is GLA with one latent head: all heads of the batch row in one program.
    _check("mla", torch.float32, q_len, splits, paged, lengths=[70, 9])


@pytest.mark.parametrize("form", ["gta-full-rope", "gla-wide-rope"])
def test_edge_widths_match_reference_fp32(form):
    _check(form, torch.float32, 2, 2, True, lengths=[70, 9])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["gta", "gla2"])
def test_kernel_matches_reference_half(form, dtype):
    _check(form, dtype, q_len=4, splits=2, paged=True, lengths=[70, 21])


def test_query_block_longer_than_cache_row_part_is_causal():
    """q_len = 4 on a row holding exactly 4 tokens (absorbed prefill): the first query sees only itself."""
    _check("gta", torch.float32, q_len=4, splits=2, paged=False, lengths=[4, 70])


def test_default_launch_heuristics():
    queries, state, rope_key = _inputs("gla2", 2, 1, 40, torch.float32)
    out = torch.full((2, 4, 1, 24), float("nan"), device=DEVICE)
    gla_decode(*queries, state, rope_key, scale=0.5, out=out)  # lengths None: every row uses all 40 tokens
    ref = naive_gla_decode(*queries, state, rope_key, scale=0.5)
    assert rel_err(out, ref) < 1e-4


def test_bad_arguments_raise_clear_errors():
    queries, state, rope_key = _inputs("gta", 1, 17, 20, torch.float32)
    with pytest.raises(ValueError, match="query length"):
        gta_decode(*queries, state, rope_key, scale=1.0)
    queries, state, rope_key = _inputs("gta", 1, 1, 20, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        gta_decode(queries[0].half(), state, rope_key, scale=1.0)
    with pytest.raises(ValueError, match="lengths"):
        gta_decode(*queries, state, rope_key, scale=1.0, block_table=torch.zeros(1, 1, dtype=torch.int32))


# --------------------------------------------------------------------------------------------- models


def _tiny(config_fn, backend, **overrides):
    model = build_model(config_fn(num_hidden_layers=1, decode_backend=backend, **overrides))
    return model.to(DEVICE)


def _narrow_latent_gla_config(**overrides):
    """Latent narrower than the no-RoPE key: the queries come out of `project` in the latent space."""
    return gla_config(kv_lora_rank=6, qk_nope_head_dim=12, **overrides)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("config_fn", [gta_config, gla_config, _narrow_latent_gla_config],
                         ids=["gta", "gla2", "gla2-narrow-latent"])
def test_model_triton_backend_matches_torch(config_fn):
    torch_model = _tiny(config_fn, "torch")
    triton_model = _tiny(config_fn, "triton")
    ids = torch.randint(3, BASE["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    # Speculative-decoding-sized step (q_len 3 against a cache) and a single-token step.
    logits = {}
    for name, model in (("torch", torch_model), ("triton", triton_model)):
        cache = output_cache(model(ids[:, :4]))
        step3 = model(ids[:, 4:], cache=cache).logits
        step1 = model(ids[:, -1:], cache=cache).logits
        logits[name] = torch.cat([step3, step1], dim=1)
    assert rel_err(logits["triton"], logits["torch"]) < 1e-4
    # generate: same tokens.
    prompt = ids[:1, :5]
    tokens = [m.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
              for m in (torch_model, triton_model)]
    assert torch.equal(tokens[0], tokens[1])


def _per_layer_widths(backend: str):
    """Four layers at different widths (what --layer and --allocate make), one kept in source form."""
    from transformers import LlamaConfig

    from gtakit.models import GtakitConfig

    source = LlamaConfig(**dict(BASE, num_hidden_layers=4), num_key_value_heads=2, head_dim=16)
    layers = [
        {"form": "gla", "num_latent_heads": 2, "kv_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
         "v_head_dim": 16},
        {"form": "gla", "num_latent_heads": 1, "kv_lora_rank": 40, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
         "v_head_dim": 16},
        {"form": "source"},
        {"form": "gta", "num_key_value_heads": 2, "head_dim": 16, "rope_dim": 8},
    ]
    return build_model(GtakitConfig.from_source(source, layers, decode_backend=backend)).to(DEVICE)


@pytest.mark.slow
@torch.no_grad()
def test_per_layer_widths_decode_through_the_kernels_as_through_torch(monkeypatch):
    from gtakit.models import attention_gtakit

    kernels = attention_gtakit.decode_kernels()
    calls = []
    for name in ("gla_decode", "gta_decode"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ids = torch.randint(3, BASE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits = {}
    for backend in ("torch", "triton"):
        model = _per_layer_widths(backend)
        cache = output_cache(model(ids[:, :6]))
        two = model(ids[:, 6:8], cache=cache).logits  # a masked step: the kernels may hand it to PyTorch
        calls.clear()
        logits[backend] = torch.cat([two, model(ids[:, 8:], cache=cache).logits], 1)
    assert rel_err(logits["triton"], logits["torch"]) < 1e-4
    # The one-token step went through the kernels of the three converted layers (two GLA widths and GTA).
    assert sorted(calls) == ["gla_decode", "gla_decode", "gta_decode"]


@torch.no_grad()
def test_model_kernel_path_is_taken_and_padding_falls_back(monkeypatch):
    from gtakit.models import attention_gtakit

    model = _tiny(gta_config, "triton")
    calls = []
    kernels = attention_gtakit.decode_kernels()
    original = kernels.gta_decode
    monkeypatch.setattr(kernels, "gta_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(3, BASE["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cache = output_cache(model(ids[:, :5]))
    model(ids[:, 5:], cache=cache)
    assert calls, "decode step did not use the Triton kernel"
    # A left-padded batch cannot be expressed as per-row lengths of this cache: the PyTorch path must run.
    calls.clear()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = output_cache(model(ids[:, :5], attention_mask=mask[:, :5]))
    model(ids[:, 5:], attention_mask=mask, cache=cache)
    assert not calls


def test_backend_selection(monkeypatch):
    from types import SimpleNamespace

    from gtakit.models import attention_gtakit

    attn = _tiny(gta_config, "torch").model.layers[0].self_attn
    query = torch.zeros(1, 4, 1, 16)
    mask = None  # plain causal over the whole cache
    # 'torch' never looks the kernels up; 'auto' does not on CPU.
    monkeypatch.setattr(attention_gtakit, "decode_kernels", lambda: pytest.fail("kernels looked up"))
    assert attn.select_decode_kernels(query, mask) is None
    attn.decode_backend = "auto"
    assert attn.select_decode_kernels(query, mask) is None
    # 'triton' where the kernels do not import (copied remote code without gtakit, or no triton): clear error.
    attn.decode_backend = "triton"
    monkeypatch.setattr(attention_gtakit, "decode_kernels", lambda: None)
    with pytest.raises(ImportError, match="decode_backend='triton'"):
        attn.select_decode_kernels(query, mask)
    # 'triton' on CPU without the interpreter: clear error rather than a Triton launch failure.
    fake = SimpleNamespace(kernels_interpreted=lambda: False, MAX_QUERY_LEN=16, SUPPORTED_DTYPES=(torch.float32,))
    monkeypatch.setattr(attention_gtakit, "decode_kernels", lambda: fake)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attn.select_decode_kernels(query, mask)


def test_kernel_on_cpu_without_interpreter_raises(monkeypatch):
    from gtakit.kernels import _decode_core

    monkeypatch.setattr(_decode_core, "kernels_interpreted", lambda: False)
    queries, state, rope_key = _inputs("gta", 1, 1, 8, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        gta_decode(*queries, state.cpu(), rope_key.cpu(), scale=1.0) if HAS_CUDA else gta_decode(
            *queries, state, rope_key, scale=1.0)


# --------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape", [("gta", 32, 8, 128, 64), ("gla2", 32, 2, 256, 64), ("mla", 32, 1, 512, 64)])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_realistic_shapes_bf16_on_gpu(shape, q_len, paged):
    form, heads, groups, width, rope = shape
    batch, total = 3, 3000
    lengths = torch.tensor([3000, 1, 1777], dtype=torch.int32, device="cuda").clamp(min=q_len)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=gen, device="cuda").bfloat16()

    state, rope_key = rand(batch, groups, total, width), rand(batch, 1, total, rope)
    queries = (rand(batch, heads, q_len, width),) if form == "gta" else (
        rand(batch, heads, q_len, width), rand(batch, heads, q_len, rope))
    op, naive = _ops(form)
    ref = naive(*queries, state, rope_key, scale=0.06, lengths=lengths)
    cache, table = (state, rope_key), None
    if paged:
        pages, rope_pages, table = to_paged(state, rope_key, lengths, page_size=64)
        cache = (pages, rope_pages)
    for splits in (None, 1, 7):
        out = torch.full_like(ref, float("nan"))
        op(*queries, *cache, scale=0.06, lengths=lengths, block_table=table, num_splits=splits, out=out)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@torch.no_grad()
@pytest.mark.parametrize("config_fn", [gta_config, gla_config], ids=["gta", "gla2"])
def test_model_auto_backend_bf16_on_gpu(config_fn):
    ids = torch.randint(3, BASE["vocab_size"], (4, 40), generator=torch.Generator().manual_seed(5)).cuda()
    logits = {}
    for backend in ("torch", "auto"):
        model = _tiny(config_fn, backend).to(torch.bfloat16)
        cache = output_cache(model(ids[:, :36]))
        logits[backend] = model(ids[:, 36:], cache=cache).logits.float()
    assert rel_err(logits["auto"], logits["torch"]) < 2e-2
