"""The in-memory format: the converted model as a `GtakitForCausalLM` in float32 (benchmarks, experiments)."""

from __future__ import annotations

from typing import Any

import torch

from gtakit.models import GtakitConfig, GtakitForCausalLM

from .base import Sink


class MemorySink(Sink):
    name = "memory"
    in_memory = True

    def start(self, config: GtakitConfig, dtype: torch.dtype) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.state[name] = tensor.detach().float()

    def finish(self, config: GtakitConfig, report: dict, **extras: Any) -> torch.nn.Module:
        model = GtakitForCausalLM(config).eval()
        missing, unexpected = model.load_state_dict(self.state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"converted state does not match the model: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
        return model
