"""Streaming sharded safetensors writer: shards planned up front, each written as soon as it is complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from gtakit.errors import GtakitError

SHARD_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*$", re.IGNORECASE)


def check_shard_size(value: str | int, option: str = "--max-shard-size") -> None:
    """A positive size such as '5GB', '500MB' or a byte count; refused in one line before any work."""
    text = str(value)
    match = SHARD_SIZE.match(text)
    positive = float(match.group(1)) > 0 if match else text.isdigit() and int(text) > 0
    if not positive:
        raise GtakitError(f"{option} {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")


class StreamingShardWriter:
    """Plan shards from a shape-only (meta) state dict, then accept tensors in any order.

    Memory stays bounded by the shards still being filled: tensors of a shard are released once it is written.
    """

    def __init__(self, folder: Path, meta_state_dict: dict[str, torch.Tensor], max_shard_size: str | int) -> None:
        self.folder = folder
        self.meta = meta_state_dict
        self.split = split_torch_state_dict_into_shards(meta_state_dict, max_shard_size=max_shard_size)
        self.file_of = dict(self.split.tensor_to_filename)
        self.remaining = {name: set(tensors) for name, tensors in self.split.filename_to_tensors.items()}
        self.pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.remaining}
        self.written: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.file_of:
            raise KeyError(f"{name} is not part of the planned checkpoint")
        expected = self.meta[name]
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the planned {tuple(expected.shape)}")
        filename = self.file_of[name]
        self.pending[filename][name] = tensor.detach().to(expected.dtype).contiguous()
        self.remaining[filename].discard(name)
        if not self.remaining[filename]:
            save_file(self.pending.pop(filename), str(self.folder / filename), metadata={"format": "pt"})
            self.written.append(filename)

    def finish(self) -> None:
        missing = sorted(name for names in self.remaining.values() for name in names)
        if missing:
            raise RuntimeError(f"conversion produced no tensor for {missing[:5]}")
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
