"""The gtakit folder: sharded safetensors under the source's weight names, config.json with `auto_map`, the flat
model files (so it loads with `trust_remote_code=True` where gtakit is not installed), tokenizer, generation
config, conversion.json and a model card. Written into a staging folder that the caller renames into place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from gtakit.models import GtakitConfig, GtakitForCausalLM

from .base import Sink, meta_state_dict
from .card import build_card, dump_json
from .shards import StreamingShardWriter

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def model_files() -> list[Path]:
    """The flat files of gtakit/models that a folder carries (everything but the package's __init__)."""
    return sorted(path for path in MODELS_DIR.glob("*.py") if path.name != "__init__.py")


def write_config(config: GtakitConfig, folder: Path, dtype: torch.dtype) -> None:
    """config.json with the architecture and `auto_map`, and the model files beside it."""
    config.architectures = [GtakitForCausalLM.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_gtakit.{GtakitConfig.__name__}",
        "AutoModelForCausalLM": f"modeling_gtakit.{GtakitForCausalLM.__name__}",
    }
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    for path in model_files():
        shutil.copyfile(path, folder / path.name)


class FolderSink(Sink):
    name = "gtakit"

    def __init__(self, folder: Path, max_shard_size: str | int = "5GB") -> None:
        self.folder = Path(folder)
        self.max_shard_size = max_shard_size

    def start(self, config: GtakitConfig, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.writer = StreamingShardWriter(self.folder, meta_state_dict(config, dtype), self.max_shard_size)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)

    def finish(self, config: GtakitConfig, report: dict | None, tokenizer: Any = None, generation_config: Any = None,
               files: dict[str, str] | None = None, **extras: Any) -> Path:
        """Weights, config, model files, tokenizer, generation config and `files`; the report and card too unless
        `report` is None (then `write_report` follows, e.g. after measuring the written model)."""
        self.writer.finish()
        write_config(config, self.folder, self.dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        if generation_config is not None:
            generation_config.save_pretrained(self.folder)
        for name, text in (files or {}).items():
            (self.folder / name).write_text(text)
        if report is not None:
            self.write_report(report)
        return self.folder

    def write_report(self, report: dict) -> None:
        (self.folder / "conversion.json").write_text(dump_json(report))
        build_card(report).save(self.folder / "README.md")


def write_model(model: torch.nn.Module, folder: Path, dtype: torch.dtype, report: dict,
                max_shard_size: str | int = "5GB", **extras: Any) -> Path:
    """A loaded gtakit model (e.g. after uptraining) through the same sink as a conversion."""
    sink = FolderSink(folder, max_shard_size)
    sink.start(model.config, dtype)
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if not (tied and name == "lm_head.weight"):
            sink.add(name, tensor.detach().cpu())
    return sink.finish(model.config, report, **extras)

