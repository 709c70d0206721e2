"""Scores over non-overlapping windows of a text: perplexity, and agreement of a model with its source."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError


def token_windows(tokenizer, text: str, max_tokens: int | None, window: int) -> torch.Tensor:
    """`[num_windows, window]` token ids of `text` (at most `max_tokens`), cut into non-overlapping windows."""
    if window < 2:
        raise GtakitError("--window must be at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    num_windows = len(ids) // window
    if num_windows == 0:
        raise GtakitError(f"the text has {len(ids)} tokens, fewer than one window of {window}; lower --window")
    return ids[: num_windows * window].view(num_windows, window)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of each predicted token of `ids` `[B, T]` (float32 `[B, T - 1]`; column
    p - 1 is the token at position p, predicted from the p before it)."""
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


def sequence_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each row of `ids` `[B, T]` (float64 `[B]`): the one scoring
    loop behind every perplexity gtakit reports (eval, convert --eval-text, finetune, loss by position)."""
    return token_nll(model, ids).sum(dim=1).double()


def token_scores(model, source, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per predicted token of one window `chunk` `[T]` (each `[T - 1]`, on the model's device): the model's and
    the source's negative log-likelihood, KL(source || model) and whether their top-1 choices agree. The one
    two-model loop behind `agreement` and `position_losses`."""
    logp = torch.log_softmax(model(chunk[None].to(_device(model)), use_cache=False).logits[0, :-1].float(), -1)
    source_logp = source(chunk[None].to(_device(source)), use_cache=False).logits[0, :-1].float()
    source_logp = torch.log_softmax(source_logp, -1).to(logp.device)
    targets = chunk[1:].to(logp.device)[:, None]
    return {
        "nll": -logp.gather(-1, targets)[:, 0],
        "source_nll": -source_logp.gather(-1, targets)[:, 0],
        "kl": (source_logp.exp() * (source_logp - logp)).sum(-1),
        "agree": logp.argmax(-1) == source_logp.argmax(-1),
    }


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    max_tokens: int | None = None,
    window: int = 1024,
    progress: bool = False,
) -> dict:
    """Perplexity of `text` over non-overlapping windows of `window` tokens (each window scored on its own)."""
    windows = token_windows(tokenizer, text, max_tokens, window)
    num_windows = len(windows)
    device = _device(model)
    total_nll, total_count = 0.0, 0
    for chunk in tqdm(windows, desc="perplexity", disable=not progress):
        total_nll += float(sequence_nll(model, chunk.unsqueeze(0).to(device)).sum())
        total_count += window - 1
    return {
        "perplexity": math.exp(total_nll / total_count),
        "nll": total_nll / total_count,
        "tokens": num_windows * window,
        "windows": num_windows,
        "window": window,
    }


@torch.no_grad()
def agreement(
    model,
    source,
    tokenizer,
    text: str,
    max_tokens: int | None = None,
    window: int = 1024,
    progress: bool = False,
) -> dict:
    """How closely `model` follows `source` on the same windows, in one pass: mean KL(source || model) per
    predicted token (nats), top-1 agreement of the next-token choice, and both perplexities."""
    return window_agreement(model, source, token_windows(tokenizer, text, max_tokens, window), progress)


@torch.no_grad()
def window_agreement(model, source, windows: torch.Tensor, progress: bool = False) -> dict:
    """`agreement` on token windows `[N, T]` already cut (each scored on its own)."""
    window = windows.shape[1]
    kl_sum, agree, nll, source_nll, count = 0.0, 0, 0.0, 0.0, 0
    for chunk in tqdm(windows, desc="agreement", disable=not progress):
        scores = token_scores(model, source, chunk)
        kl_sum += float(scores["kl"].sum())
        agree += int(scores["agree"].sum())
        nll += float(scores["nll"].sum())
        source_nll += float(scores["source_nll"].sum())
        count += window - 1
    return {
        "kl": kl_sum / count,
        "top1_agreement": agree / count,
        "perplexity": math.exp(nll / count),
        "source_perplexity": math.exp(source_nll / count),
        "tokens": len(windows) * window,
        "windows": len(windows),
        "window": window,
    }
