"""Output formats: a conversion is a plan, a stream of tensors and a sink that writes them somewhere.

A sink is told the target config before the first tensor (`start`, so it can plan shards from shapes), takes
tensors one at a time in any order (`add`) and completes with the final config (the RoPE frequencies each layer
kept are known only after its conversion) and the report (`finish`). `constraints` name what planning must
honour for this format (none for the gtakit folder; a native DeepSeek-V3 export would need one global RoPE grid).
"""

from __future__ import annotations

from typing import Any

import torch

from gtakit.models import GtakitConfig, GtakitForCausalLM


class Sink:
    name = ""
    constraints: frozenset[str] = frozenset()
    hint = "choose another form or format"  # what to do when a form cannot meet `constraints`
    # Capability: the sink collects the whole converted model in memory (float32) before anything is written.
    in_memory = False

    def start(self, config: GtakitConfig, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, config: GtakitConfig, report: dict, **extras: Any) -> Any:
        raise NotImplementedError


def meta_state_dict(config: GtakitConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes of the checkpoint `config` describes (no memory: built on the meta device)."""
    with torch.device("meta"):
        model = GtakitForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        state[name] = tensor.to(dtype)
    return state
