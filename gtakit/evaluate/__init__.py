"""`gtakit eval`: perplexity, agreement with the source, loss by position, long-context retrieval and
lm-evaluation-harness tasks."""

from .loading import conversion_source, kv_bytes_per_token, load_model
from .positions import position_losses
from .windows import agreement, perplexity, token_windows, window_agreement

__all__ = ["agreement", "conversion_source", "kv_bytes_per_token", "load_model", "perplexity", "position_losses",
           "token_windows", "window_agreement"]
