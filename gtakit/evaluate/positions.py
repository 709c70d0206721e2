"""Loss by position within long windows (`gtakit eval --positions`).

A whole-window perplexity averages every position together, and most tokens of a text are predictable from the
last few hundred. A compressed key that loses long-range position information therefore barely moves it, while the
tokens far into a window, the ones that need distant context, get worse. Splitting the same windows' loss into
buckets of position shows that, and the ratio to the source per bucket shows whether the conversion's loss grows
with distance (`distance_growth`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError

from .windows import token_nll, token_scores, token_windows

# Short, medium and long range; a window longer than the last gets one more bucket up to its end, so the buckets
# always cover every position and their token-weighted mean is the whole-window loss.
DEFAULT_BOUNDS = (0, 512, 2048, 4096, 8192)


def check_window(config, window: int, option: str = "--window") -> None:
    """Refuse windows past the positions the model (of this `config`) was trained for: the loss there measures
    extrapolation, not the conversion."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and window > limit:
        raise GtakitError(f"{option} {window} exceeds the model's {limit} positions (max_position_embeddings); "
                          f"use {option} {limit} or less")


def bucket_bounds(window: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """Bucket boundaries (positions within a window): `buckets` checked, or the defaults clipped to `window`."""
    if buckets is None:
        return (*(b for b in DEFAULT_BOUNDS if b < window), window)
    bounds = tuple(int(b) for b in buckets)
    if len(bounds) < 2 or bounds[0] < 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise GtakitError(f"--buckets must be at least two increasing positions from 0, e.g. 0,512,2048; "
                          f"got {','.join(map(str, bounds))}")
    if bounds[-1] > window:
        raise GtakitError(f"--buckets ends at {bounds[-1]}, past the --window of {window}; raise --window or end "
                          f"the buckets at {window} or less")
    return bounds


def _bucket_columns(bounds: tuple[int, ...], window: int) -> list[tuple[int, int, slice]]:
    """(start, end, columns of the per-token loss) per non-empty bucket. The token at position p is predicted from
    the p before it and sits in column p - 1; position 0 is never predicted, so a bucket [0, 1) is empty."""
    spans = []
    for start, end in zip(bounds, bounds[1:]):
        first, stop = max(start, 1), min(end, window)
        if stop > first:
            spans.append((start, end, slice(first - 1, stop - 1)))
    return spans


def _window_scores(model, source, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
    if source is None:  # one model: no second forward pass, no full log-softmax kept
        return {"nll": token_nll(model, chunk[None].to(next(model.parameters()).device))[0]}
    return token_scores(model, source, chunk)


def _buckets(sums: torch.Tensor, spans: list[tuple[int, int, slice]], num_windows: int) -> list[dict]:
    rows = []
    for total, (start, end, columns) in zip(sums.tolist(), spans):
        tokens = (columns.stop - columns.start) * num_windows
        rows.append({"start": start, "end": end, "tokens": tokens, "nll": total / tokens,
                     "perplexity": math.exp(total / tokens)})
    return rows


def compare_buckets(model_buckets: list[dict], source_buckets: list[dict]) -> dict:
    """Model and source side by side per bucket (same windows and buckets), with `ratio` = model perplexity /
    source perplexity, and `distance_growth` = the last bucket's ratio over the first's: above 1, the model loses
    more to its source the further a token is from the window's start."""
    buckets = [dict(mine, source_nll=theirs["nll"], source_perplexity=theirs["perplexity"],
                    ratio=mine["perplexity"] / theirs["perplexity"])
               for mine, theirs in zip(model_buckets, source_buckets)]
    return {"buckets": buckets, "distance_growth": buckets[-1]["ratio"] / buckets[0]["ratio"]}


@torch.no_grad()
def position_losses(
    model,
    tokenizer,
    text: str,
    window: int,
    max_tokens: int | None = None,
    buckets: Sequence[int] | None = None,
    against=None,
    progress: bool = False,
) -> dict:
    """Loss per position bucket over non-overlapping windows of `text` (the windows `perplexity` scores).

    Returns the whole-window figures `perplexity` returns (and, with `against`, those `agreement` returns, from the
    same forward passes) plus `buckets`: per bucket its `start`/`end` positions, predicted `tokens`, mean `nll` and
    `perplexity`; with `against` (a source model) also `source_nll`, `source_perplexity`, `ratio`, and the overall
    `distance_growth`."""
    check_window(model.config, window)
    if against is not None:
        check_window(against.config, window)
    windows = token_windows(tokenizer, text, max_tokens, window)
    spans = _bucket_columns(bucket_bounds(window, buckets), window)
    if not spans:
        raise GtakitError("--buckets leave no predicted token in any bucket; widen them")
    names = ("nll",) if against is None else ("nll", "source_nll")
    sums = {name: torch.zeros(len(spans), dtype=torch.float64) for name in names}
    totals: dict[str, float] = {}
    for chunk in tqdm(windows, desc="positions", disable=not progress):
        scores = _window_scores(model, against, chunk)
        for name, values in scores.items():
            totals[name] = totals.get(name, 0.0) + float(values.double().sum())
        for name in names:
            sums[name] += torch.stack([scores[name][cols].double().sum().cpu() for _, _, cols in spans])
    count = len(windows) * (window - 1)
    result = {"perplexity": math.exp(totals["nll"] / count), "nll": totals["nll"] / count,
              "tokens": len(windows) * window, "windows": len(windows), "window": window}
    model_buckets = _buckets(sums["nll"], spans, len(windows))
    if against is None:
        return {**result, "buckets": model_buckets}
    result.update(kl=totals["kl"] / count, top1_agreement=totals["agree"] / count,
                  source_perplexity=math.exp(totals["source_nll"] / count))
    return {**result, **compare_buckets(model_buckets, _buckets(sums["source_nll"], spans, len(windows)))}
