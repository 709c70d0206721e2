"""`gtakit eval`: perplexity, agreement with the source, long-context retrieval and lm-evaluation-harness tasks."""

from .loading import conversion_source, kv_bytes_per_token, load_model
from .windows import agreement, perplexity, token_windows

__all__ = ["agreement", "conversion_source", "kv_bytes_per_token", "load_model", "perplexity", "token_windows"]
