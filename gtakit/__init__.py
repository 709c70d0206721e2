"""gtakit: convert Hugging Face MHA/GQA language models to GTA, GLA, MLA and GHLA attention."""

from __future__ import annotations

__version__ = "0.3.0"

import os
import sys

from transformers import AutoConfig, AutoModelForCausalLM

try:
    from .models import configuration_gtakit  # noqa: F401  (refuses an unsupported transformers first)
except ImportError as err:
    # The `gtakit` command answers in one line, like every other failure it reports; `import gtakit` raises.
    if os.path.basename(sys.argv[0]) == "gtakit" and "transformers" in str(err):
        raise SystemExit(f"gtakit: {err}") from None
    raise

from .models import GtakitConfig, GtakitForCausalLM


def _register() -> None:
    AutoConfig.register(GtakitConfig.model_type, GtakitConfig, exist_ok=True)
    AutoModelForCausalLM.register(GtakitConfig, GtakitForCausalLM, exist_ok=True)
    # save_pretrained then writes auto_map and copies the flat modeling files next to the weights.
    GtakitConfig.register_for_auto_class()
    GtakitForCausalLM.register_for_auto_class("AutoModelForCausalLM")


_register()

__all__ = ["GtakitConfig", "GtakitForCausalLM", "__version__"]
