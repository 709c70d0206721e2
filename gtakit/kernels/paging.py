"""Cache layouts for the decode kernels: contiguous `[B, n, T, W]` rows or fixed-size pages with a block table.

The paged layout is the contiguous one applied to pages: pages `[P, n, page_size, W]` (and `[P, 1, page_size, R]`
for the shared RoPE key), and `block_table[b, k]` is the page holding tokens `k * page_size ...` of row b
(vLLM / FlashMLA style, but group-major inside a page so one group's tokens stay contiguous).
"""

from __future__ import annotations

import torch

DEFAULT_PAGE_SIZE = 64


def to_paged(
    state: torch.Tensor,
    rope_key: torch.Tensor,
    lengths: torch.Tensor,
    page_size: int = DEFAULT_PAGE_SIZE,
    generator: torch.Generator | None = None,
    spare_pages: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy a contiguous cache into shuffled pages.

    state `[B, n, T, W]`, rope_key `[B, 1, T, R]`, lengths `[B]`. Returns pages `[P, n, page_size, W]`, rope pages
    `[P, 1, page_size, R]` and block_table `[B, ceil(T / page_size)]` int32. Pages are handed out in a random order
    (plus `spare_pages` unused ones filled with NaN) so that a kernel ignoring the table gives wrong results; table
    entries past a row's length point at page 0, which the kernel must not read for that row.
    """
    batch, groups, total, width = state.shape
    per_row = -(-total // page_size)
    needed = (lengths.to(torch.long).cpu() + page_size - 1) // page_size
    used = torch.arange(per_row)[None, :] < needed[:, None]  # [B, K] pages a row really occupies
    num_used = int(used.sum())
    order = torch.randperm(num_used + spare_pages, generator=generator)
    table = torch.zeros(batch, per_row, dtype=torch.int32)
    table[used] = order[:num_used].to(torch.int32)

    def paginate(x: torch.Tensor) -> torch.Tensor:
        # [B, n, T, w] -> NaN-padded to K pages -> [B, K, n, page, w] -> the used pages, placed by the table.
        if per_row * page_size == total:  # no padding copy (benchmarks page multi-GiB caches)
            padded = x.contiguous()
        else:
            padded = torch.full(
                (batch, x.shape[1], per_row * page_size, x.shape[3]), float("nan"), dtype=x.dtype, device=x.device
            )
            padded[:, :, :total] = x
        blocks = padded.view(batch, x.shape[1], per_row, page_size, x.shape[3]).transpose(1, 2)
        out = torch.full((num_used + spare_pages, x.shape[1], page_size, x.shape[3]), float("nan"), dtype=x.dtype,
                         device=x.device)
        out[order[:num_used].to(x.device)] = blocks[used.to(x.device)]
        return out

    return paginate(state), paginate(rope_key), table.to(state.device)


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Pages `[P, n, page_size, W]` and block_table `[B, K]` -> contiguous `[B, n, K * page_size, W]`."""
    batch, per_row = block_table.shape
    _, groups, page_size, width = pages.shape
    rows = pages[block_table.long()]  # [B, K, n, page, W]
    return rows.permute(0, 2, 1, 3, 4).reshape(batch, groups, per_row * page_size, width)
