"""The Triton decode kernel shared by GTA and GLA: attention of a few queries over a grouped compressed cache.

Both forms reduce, at decode time, to the same problem (DESIGN.md section 3): per group (GTA tied state /
GLA latent head) n, a state `S[t]` of width W is both the no-RoPE key (its first QK_DIM coordinates; GTA:
head_dim - rope_dim, GLA: all of them, the query having absorbed W_uk) and the value (all W coordinates),
and one RoPE key `k_r[t]` of width R is shared by every head:

    score[h, t] = q_state[h] . S[t, :QK_DIM] + q_rope[h] . k_r[t]
    out[h]      = softmax_t(scale * score[h, :]) @ S

so one kernel serves both: each program owns one (batch row, group, block of query rows, sequence split) and
streams the group's state once for all the heads (and all the query positions) that read it; the shared RoPE key
is loaded once per token. When batch x groups leaves SMs idle the sequence is split across programs
(flash-decoding) and a second kernel merges the partial outputs by their log-sum-exp.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Speculative decoding verifies a handful of tokens at once; longer query blocks are prefill (plain path).
MAX_QUERY_LEN = 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Only builtins and our own @triton.jit helpers inside the kernels: triton.language's library functions (tl.max,
# tl.sum, tl.cdiv, tl.zeros) are themselves jit functions built when triton is first imported, so if anything
# imported triton before TRITON_INTERPRET=1 was set they could not run inside an interpreted kernel.
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _grouped_decode_kernel(
    q_state_ptr, q_rope_ptr, state_ptr, rope_ptr, lengths_ptr, table_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    stride_qsb, stride_qsh, stride_qsl,
    stride_qrb, stride_qrh, stride_qrl,
    stride_sb, stride_sn, stride_st,
    stride_rb, stride_rt,
    stride_table,
    stride_ob, stride_oh, stride_ol,
    scale_log2,
    q_len, heads_per_group, num_groups, num_heads,
    QK_DIM: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Query-row blocks of one (row, group) are adjacent in launch order so that they share its state via L2.
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)
    # int64 row offsets: a 128 x 8 x 64K x 128 cache has more than 2**31 elements.
    b = (pid_bg // num_groups).to(tl.int64)
    g = pid_bg % num_groups
    length = tl.load(lengths_ptr + b)

    # Query rows of this program: head-major, then query position (row = local_head * q_len + i).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < heads_per_group * q_len
    head = g * heads_per_group + rows // q_len
    qpos_idx = rows % q_len
    # Query i of the block sits at cache position length - q_len + i and sees tokens up to it (causal).
    qpos = length - q_len + qpos_idx

    offs_w = tl.arange(0, BLOCK_W)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    q_state = tl.load(
        q_state_ptr + b * stride_qsb + head[:, None] * stride_qsh + qpos_idx[:, None] * stride_qsl + offs_w[None, :],
        mask=row_ok[:, None] & (offs_w[None, :] < QK_DIM), other=0.0,
    )
    q_rope = tl.load(
        q_rope_ptr + b * stride_qrb + head[:, None] * stride_qrh + qpos_idx[:, None] * stride_qrl + offs_r[None, :],
        mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0,
    )
    if DOT_FP32:
        q_state = q_state.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    # This split's token range, in whole blocks so that splits never share a block.
    per_split = ((length + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, length)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_W], 0.0, dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        tok_ok = tok < hi
        if PAGED:
            page = tl.load(table_ptr + b * stride_table + tok // PAGE_SIZE, mask=tok_ok, other=0).to(tl.int64)
            in_page = tok % PAGE_SIZE
            state_rows = page * stride_sb + in_page * stride_st
            rope_rows = page * stride_rb + in_page * stride_rt
        else:
            state_rows = b * stride_sb + tok * stride_st
            rope_rows = b * stride_rb + tok * stride_rt
        # One load of the group's state block serves as key and value for every query row of the program.
        s_blk = tl.load(
            state_ptr + g * stride_sn + state_rows[:, None] + offs_w[None, :],
            mask=tok_ok[:, None] & (offs_w[None, :] < W), other=0.0,
        )
        r_blk = tl.load(
            rope_ptr + rope_rows[:, None] + offs_r[None, :],
            mask=tok_ok[:, None] & (offs_r[None, :] < R), other=0.0,
        )
        if DOT_FP32:
            s_blk = s_blk.to(tl.float32)
            r_blk = r_blk.to(tl.float32)
        if IEEE_DOT:  # fp32 inputs: no TF32 truncation, so fp32 results match a float64 reference closely
            scores = tl.dot(q_state, tl.trans(s_blk), input_precision="ieee")
            scores += tl.dot(q_rope, tl.trans(r_blk), input_precision="ieee")
        else:
            scores = tl.dot(q_state, tl.trans(s_blk))
            scores += tl.dot(q_rope, tl.trans(r_blk))
        visible = tok_ok[None, :] & (tok[None, :] <= qpos[:, None])
        scores = tl.where(visible, scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, _max_combine))
        # A row may see nothing in this block (causal tail, empty split): keep exp2 away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(s_blk.dtype), s_blk, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(s_blk.dtype), s_blk)
        m_i = m_new

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    col_ok = offs_w[None, :] < W
    if NUM_SPLITS == 1:
        dst = out_ptr + b * stride_ob + head[:, None] * stride_oh + qpos_idx[:, None] * stride_ol + offs_w[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
    else:
        # Partials: [B * H * q_len, NUM_SPLITS, W] fp32 outputs (normalised) and their log2-sum-exp.
        flat = (b * num_heads + head) * q_len + qpos_idx
        tl.store(
            part_out_ptr + (flat[:, None] * NUM_SPLITS + pid_s) * W + offs_w[None, :], out,
            mask=row_ok[:, None] & col_ok,
        )
        lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + flat * NUM_SPLITS + pid_s, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_ol,
    q_len, num_heads,
    W: tl.constexpr, BLOCK_W: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (query row, block of BLOCK_W output columns): the partial tile stays small in registers.
    flat = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_W
    i = flat % q_len
    head = (flat // q_len) % num_heads
    b = flat // (q_len * num_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_w = col0 + tl.arange(0, BLOCK_W)
    split_ok = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + flat * NUM_SPLITS + offs_s, mask=split_ok, other=float("-inf"))
    top = tl.reduce(lse, 0, _max_combine)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - top))
    parts = tl.load(
        part_out_ptr + (flat * NUM_SPLITS + offs_s[:, None]) * W + offs_w[None, :],
        mask=split_ok[:, None] & (offs_w[None, :] < W), other=0.0,
    )
    merged = tl.reduce(parts * weight[:, None], 0, _add_combine) / tl.reduce(weight, 0, _add_combine)
    tl.store(
        out_ptr + b * stride_ob + head * stride_oh + i * stride_ol + offs_w,
        merged.to(out_ptr.dtype.element_ty), mask=offs_w < W,
    )


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters; `choose_config` picks them, benchmarks may override any."""

    block_m: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


def _pow2(n: int, floor: int = 16) -> int:
    # tl.dot needs every block dimension >= 16 on GPU.
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def kernels_interpreted() -> bool:
    """True when the kernels were built by TRITON_INTERPRET=1 (they then run on CPU tensors, slowly)."""
    return type(_grouped_decode_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_config(
    batch: int, groups: int, rows: int, width: int, max_tokens: int, device: torch.device,
    num_splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> DecodeConfig:
    """Heuristic launch parameters for `rows = heads_per_group * q_len` query rows per group."""
    block_w = _pow2(width)
    # Register budget: the fp32 accumulator (block_m x block_w), the query rows (replicated across the warps that
    # split the token axis) and the state tile. These caps are the largest blocks that compile without register
    # spills for sm_90 (bf16, paged and contiguous; `python -m gtakit.kernels.aot_check` shows it without a GPU).
    # They are not tuned for speed on a GPU yet: benchmarks can override every field.
    if block_w <= 128:
        block_m = block_m or min(_pow2(rows), 64)
        block_n = block_n or (64 if block_m <= 32 else 32)
    elif block_w <= 256:
        block_m = block_m or min(_pow2(rows), 32)
        block_n = block_n or 32
    else:
        block_m = block_m or 16
        block_n = block_n or 32
    if num_splits is None:
        programs = batch * groups * triton.cdiv(rows, block_m)
        # Aim at about two waves of programs over the SMs, never below 4 blocks of tokens per split.
        target = 2 * _sm_count(device)
        num_splits = 1 if programs >= target else min(target // programs, triton.cdiv(max_tokens, 4 * block_n), 64)
        num_splits = max(1, num_splits)
    num_warps = num_warps or 8
    num_stages = num_stages or 2
    return DecodeConfig(block_m, block_n, int(num_splits), num_warps, num_stages)


def grouped_decode(
    q_state: torch.Tensor,
    q_rope: torch.Tensor,
    state: torch.Tensor,
    rope_key: torch.Tensor,
    *,
    qk_dim: int,
    scale: float,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Launch the shared kernel; see `gta_decode` / `gla_decode` for the meaning of the arguments.

    q_state `[B, H, L, >= qk_dim]` (only the first `qk_dim` columns are read), q_rope `[B, H, L, R]`,
    state `[B, n, T, W]` or pages `[P, n, page, W]`, rope_key `[B, 1, T, R]` or `[P, 1, page, R]`,
    lengths `[B]` int, block_table `[B, pages_per_row]` int. Returns out `[B, H, L, W]`.
    """
    batch, num_heads, q_len, _ = q_state.shape
    groups, width, rope_dim = state.shape[1], state.shape[3], rope_key.shape[3]
    _check_inputs(q_state, q_rope, state, rope_key, qk_dim, lengths, block_table)
    if not (state.is_cuda or kernels_interpreted()):
        raise RuntimeError(
            "gtakit Triton decode kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing "
            "gtakit.kernels (slow, for tests) or use the PyTorch path (decode_backend='torch')"
        )
    paged = block_table is not None
    page_size = state.shape[2] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else state.shape[2]
    if lengths is None:
        if paged:
            raise ValueError("a paged cache needs `lengths`")
        lengths = torch.full((batch,), capacity, dtype=torch.int32, device=state.device)
    heads_per_group = num_heads // groups
    rows = heads_per_group * q_len
    if config is None:
        config = choose_config(batch, groups, rows, width, capacity, state.device, num_splits=num_splits)
    elif num_splits is not None:
        config = DecodeConfig(config.block_m, config.block_n, num_splits, config.num_warps, config.num_stages)
    if out is None:
        out = torch.empty(batch, num_heads, q_len, width, dtype=q_state.dtype, device=q_state.device)
    elif out.shape != (batch, num_heads, q_len, width) or out.stride(-1) != 1:
        raise ValueError(f"`out` must be [B, H, L, W] = {(batch, num_heads, q_len, width)} with unit last stride")
    splits = config.num_splits
    if splits > 1:
        part_out = torch.empty(batch * num_heads * q_len, splits, width, dtype=torch.float32, device=state.device)
        part_lse = torch.empty(batch * num_heads * q_len, splits, dtype=torch.float32, device=state.device)
    else:
        part_out = part_lse = out  # unused
    table = block_table if paged else lengths  # any valid pointer when not paged
    grid = (triton.cdiv(rows, config.block_m), batch * groups, splits)
    if batch * groups > 65535 or splits > 65535:
        raise ValueError(f"batch x groups = {batch * groups} exceeds the launch grid limit 65535")
    _grouped_decode_kernel[grid](
        q_state, q_rope, state, rope_key, lengths, table,
        out, part_out, part_lse,
        q_state.stride(0), q_state.stride(1), q_state.stride(2),
        q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
        state.stride(0), state.stride(1), state.stride(2),
        rope_key.stride(0), rope_key.stride(2),
        table.stride(0) if paged else 0,
        out.stride(0), out.stride(1), out.stride(2),
        scale * math.log2(math.e),
        q_len, heads_per_group, groups, num_heads,
        QK_DIM=qk_dim, W=width, R=rope_dim,
        BLOCK_W=_pow2(width), BLOCK_R=_pow2(rope_dim), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        PAGED=paged, PAGE_SIZE=page_size, NUM_SPLITS=splits, IEEE_DOT=state.dtype == torch.float32,
        # Triton's CPU interpreter computes bf16 tl.dot wrongly (seen with triton 3.9): upcast there only.
        DOT_FP32=state.dtype == torch.bfloat16 and kernels_interpreted(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        merge_w = min(_pow2(width), 64)
        _merge_splits_kernel[(batch * num_heads * q_len, triton.cdiv(width, merge_w))](
            part_out, part_lse, out,
            out.stride(0), out.stride(1), out.stride(2),
            q_len, num_heads,
            W=width, BLOCK_W=merge_w, NUM_SPLITS=splits, BLOCK_S=_pow2(splits, floor=2),
            num_warps=4,
        )
    return out


def _check_inputs(q_state, q_rope, state, rope_key, qk_dim, lengths, block_table) -> None:
    batch, num_heads, q_len, _ = q_state.shape
    groups = state.shape[1]
    if state.dtype not in SUPPORTED_DTYPES or len({q_state.dtype, q_rope.dtype, state.dtype, rope_key.dtype}) != 1:
        raise TypeError(f"queries and cache must share one dtype of {SUPPORTED_DTYPES}")
    if not 1 <= q_len <= MAX_QUERY_LEN:
        raise ValueError(f"query length must be 1..{MAX_QUERY_LEN}, got {q_len}")
    if num_heads % groups:
        raise ValueError(f"{groups} groups must divide {num_heads} query heads")
    if q_rope.shape[:3] != q_state.shape[:3] or q_rope.shape[3] != rope_key.shape[3]:
        raise ValueError(f"q_rope {tuple(q_rope.shape)} does not match q_state / rope_key")
    if rope_key.shape[1] != 1 or rope_key.shape[0] != state.shape[0] or rope_key.shape[2] != state.shape[2]:
        raise ValueError(f"rope_key {tuple(rope_key.shape)} must be [B or pages, 1, T or page, R] like the state")
    if qk_dim > state.shape[3] or qk_dim > q_state.shape[3]:
        raise ValueError(f"qk_dim {qk_dim} exceeds the state / query width")
    for name, tensor in (("q_state", q_state), ("q_rope", q_rope), ("state", state), ("rope_key", rope_key)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dimension")
    if block_table is None and state.shape[0] != batch:
        raise ValueError(f"contiguous cache has {state.shape[0]} rows for a batch of {batch}")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != batch):
        raise ValueError("block_table must be [B, pages_per_row]")
    if lengths is not None and (lengths.shape != (batch,) or lengths.dtype not in (torch.int32, torch.int64)):
        raise ValueError("lengths must be an int32/int64 tensor [B]")
