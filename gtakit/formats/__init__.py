"""Output formats of a conversion (sinks); adding a format is one module and one entry in `FORMATS`."""

from __future__ import annotations

from .base import Sink, meta_state_dict
from .folder import FolderSink, write_model
from .memory import MemorySink
from .shards import check_shard_size

FORMATS: dict[str, type[Sink]] = {sink.name: sink for sink in (FolderSink, MemorySink)}

__all__ = ["FORMATS", "FolderSink", "MemorySink", "Sink", "check_shard_size", "meta_state_dict", "write_model"]
