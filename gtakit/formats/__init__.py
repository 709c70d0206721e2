"""Output formats of a conversion: one `Sink` per format (the gtakit folder, in memory)."""

from __future__ import annotations

from .base import Sink, meta_state_dict
from .folder import FolderSink, write_model
from .memory import MemorySink
from .shards import check_shard_size

__all__ = ["FolderSink", "MemorySink", "Sink", "check_shard_size", "meta_state_dict", "write_model"]
