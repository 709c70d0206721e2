"""Recovery measured as distance to the source: what uptraining won back, scored before and after training.

Perplexity on the training text's own domain drops whether or not the model gets closer to its source (the source
itself would improve there), so the recovery figures are the distance to the source on held-out text of another
domain (`recovery.text`): mean KL(source || model) per token, top-1 agreement and both perplexities; opt-in,
passkey retrieval and the loss by position. Scored on the main process on plain (unwrapped) models, so a
distributed run measures the same way as a single process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gtakit.evaluate import load_model, position_losses, token_windows, window_agreement
from gtakit.evaluate.passkey import passkey
from gtakit.io.text import read_text

from .recipe import Recipe

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class RecoveryScorer:
    """Scores a model against `recipe.recovery.against` on the recovery text; the source is loaded once."""

    def __init__(self, recipe: Recipe, tokenizer, eval_rows: torch.Tensor, source_spec: str | None,
                 source=None) -> None:
        self.section = recipe.recovery
        self.tokenizer = tokenizer
        self.body = "\n\n".join(read_text(path, "recovery.text") for path in self.section.text) if self.section.text else None
        if self.body is not None:
            self.windows = token_windows(tokenizer, self.body, self.section.tokens, self.section.window)
            self.where = [str(Path(path)) for path in self.section.text]
        else:  # the evaluation rows: same domain as training
            rows = max(1, self.section.tokens // eval_rows.shape[1])
            self.windows, self.where = eval_rows[:rows].long(), "data.eval (same domain as data.train)"
        self.source_name = source_spec or "bundled SmolLM2-135M"
        self.source = source if source is not None else load_model(source_spec)[0].eval()
        self.source_passkey = self._passkey(self.source) if self.section.passkey else None

    def _passkey(self, model) -> dict:
        section = self.section
        lengths = tuple(n for n in section.passkey_lengths
                        if n <= getattr(model.config, "max_position_embeddings", n))
        return passkey(model, self.tokenizer, lengths, DEPTHS, section.passkey_trials, haystack=self.body)["by_length"]

    @torch.no_grad()
    def score(self, model) -> dict:
        was_training = model.training
        model.eval()
        result = window_agreement(model, self.source, self.windows)
        if self.section.passkey:
            result["passkey"] = self._passkey(model)
        if self.section.positions and self.body is not None:
            buckets = position_losses(model, self.tokenizer, self.body, self.section.window, self.section.tokens,
                                      against=self.source)
            result["positions"] = {key: buckets[key] for key in ("buckets", "distance_growth") if key in buckets}
        model.train(was_training)
        return result

    def describe(self) -> dict:
        return {"against": self.source_name, "text": self.where, "tokens": int(self.windows.numel()),
                "window": int(self.windows.shape[1]), "source_passkey": self.source_passkey}


def card_rows(recovery: dict) -> list[str]:
    """Markdown table of the recovery figures (before / after)."""
    before, after = recovery["before"], recovery["after"]
    rows = ["| | KL(source ‖ model) nats/token | top-1 agreement | perplexity | source perplexity |",
            "|---|---|---|---|---|"]
    for label, scores in (("before uptraining", before), ("after uptraining", after)):
        rows.append(f"| {label} | {scores['kl']:.4f} | {scores['top1_agreement']:.1%} | {scores['perplexity']:.3f} "
                    f"| {scores['source_perplexity']:.3f} |")
    if "passkey" in after:
        source = recovery.get("source_passkey") or {}
        rows += ["", "| passkey length | source | before | after |", "|---|---|---|---|"]
        for length, rate in after["passkey"].items():
            src = source.get(length, {}).get("accuracy")
            rows.append(f"| {length} | {'' if src is None else f'{src:.0%}'} | "
                        f"{before['passkey'][length]['accuracy']:.0%} | {rate['accuracy']:.0%} |")
    return rows
