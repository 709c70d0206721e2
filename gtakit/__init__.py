"""gtakit: convert Hugging Face MHA/GQA language models to GTA, GLA, MLA and GHLA attention."""

from __future__ import annotations

__version__ = "0.1.0"

import os
import sys

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

try:
    from .models import configuration_gtakit  # noqa: F401  (refuses an unsupported transformers first)
except ImportError as err:
    # The `gtakit` command answers in one line, like every other failure it reports; `import gtakit` raises.
    if os.path.basename(sys.argv[0]) == "gtakit" and "transformers" in str(err):
        raise SystemExit(f"gtakit: {err}") from None
    raise

from .models import (
    GHLAConfig,
    GHLAForCausalLM,
    GHLAModel,
    GLAConfig,
    GLAForCausalLM,
    GLAModel,
    GTAConfig,
    GTAForCausalLM,
    GTAModel,
)


def _register() -> None:
    for config_cls, base_cls, lm_cls in (
        (GTAConfig, GTAModel, GTAForCausalLM),
        (GLAConfig, GLAModel, GLAForCausalLM),
        (GHLAConfig, GHLAModel, GHLAForCausalLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
        # save_pretrained then writes auto_map and copies the flat modeling files next to the weights.
        config_cls.register_for_auto_class()
        base_cls.register_for_auto_class("AutoModel")
        lm_cls.register_for_auto_class("AutoModelForCausalLM")


_register()

__all__ = [
    "GHLAConfig",
    "GHLAForCausalLM",
    "GHLAModel",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "GTAConfig",
    "GTAForCausalLM",
    "GTAModel",
    "__version__",
]
