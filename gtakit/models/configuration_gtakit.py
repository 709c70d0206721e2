"""Configuration of a gtakit model: the source family's own config plus one attention spec per layer.

Flat file on purpose: it is copied next to converted weights so that they load with
`trust_remote_code=True` on machines without gtakit. It must import nothing from gtakit.

Every field of the source's config (a `LlamaConfig`, `Qwen2Config`, ...) is kept as a field of this config, so
code that reads `config.vocab_size` or `config.num_hidden_layers` (generation, losses) sees the source's values,
and `source_config()` rebuilds the family's config to build the family's own model. The gtakit part is:

* `source_model_type`: the family (`llama`, `qwen2`, ...);
* `gtakit_layers`: one dict per decoder layer, `{"form": "source"}` for a layer kept as it is, or the form's
  name (`gta`, `gla`, `ghla`) with its widths, e.g. `{"form": "gla", "num_latent_heads": 2, "kv_lora_rank": 96,
  "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "rope_index": [...]}`; `rope_index` lists,
  per rotating pair, which of the family's RoPE frequencies it uses (conversion keeps a different subset in
  every layer);
* `gtakit_layers_path`, `gtakit_attention_name`: where the family keeps its decoder layers and, in each, the
  attention module (`model.layers`, `self_attn` for Llama-style families);
* `decode_backend`: `auto`, `torch` or `triton` for the absorbed decode step.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version
from transformers import AutoConfig, PretrainedConfig

# The transformers releases these models are tested with (CI runs the oldest and the newest on PyPI). Outside the
# range generation can go silently wrong (5.24 renamed the cache argument), so loading is refused instead.
SUPPORTED_TRANSFORMERS = ">=5.17,<6"
_OLDEST, _FIRST_UNSUPPORTED = Version("5.17.0"), Version("6.0.0.dev0")  # 6.0 pre-releases are outside too


def check_transformers_version(installed: str = transformers.__version__) -> None:
    if not _OLDEST <= Version(installed) < _FIRST_UNSUPPORTED:
        raise ImportError(
            f"gtakit models need transformers {SUPPORTED_TRANSFORMERS} but {installed} is installed; "
            f"run: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


check_transformers_version()

SOURCE_FORM = "source"
DECODE_BACKENDS = ("auto", "torch", "triton")
# Fields that belong to this config, not to the source family's.
OWN_FIELDS = ("source_model_type", "gtakit_layers", "gtakit_layers_path", "gtakit_attention_name", "decode_backend",
              "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


class GtakitConfig(PretrainedConfig):
    model_type = "gtakit"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        source_model_type: str = "llama",
        gtakit_layers: list[dict] | None = None,
        decode_backend: str = "auto",
        gtakit_layers_path: str = "model.layers",
        gtakit_attention_name: str = "self_attn",
        **source_fields: Any,
    ) -> None:
        self.source_model_type = source_model_type
        self.decode_backend = decode_backend
        self.gtakit_layers_path = gtakit_layers_path
        self.gtakit_attention_name = gtakit_attention_name
        super().__init__(**source_fields)
        layers = getattr(self, "num_hidden_layers", None)
        self.gtakit_layers = [dict(spec) for spec in gtakit_layers] if gtakit_layers is not None else (
            [{"form": SOURCE_FORM} for _ in range(layers or 0)])
        self._validate()

    def _validate(self) -> None:
        if self.decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"`decode_backend` must be one of {DECODE_BACKENDS}, got {self.decode_backend!r}")
        layers = getattr(self, "num_hidden_layers", None)
        if layers is not None and len(self.gtakit_layers) != layers:
            raise ValueError(f"`gtakit_layers` has {len(self.gtakit_layers)} entries for {layers} decoder layers")
        for index, spec in enumerate(self.gtakit_layers):
            if not isinstance(spec, dict) or "form" not in spec:
                raise ValueError(f"`gtakit_layers[{index}]` must be a dict with a 'form', got {spec!r}")

    @classmethod
    def from_source(cls, source: PretrainedConfig, layers: list[dict], **kwargs: Any) -> "GtakitConfig":
        """The config of `source`'s family model with the attention of each layer described by `layers`."""
        fields = {k: v for k, v in source.to_dict().items() if k not in OWN_FIELDS}
        # The standard names of families that store others (GPT-2's n_layer is num_hidden_layers), so that
        # generation and caches read them here as on the family's config.
        fields.update({alias: getattr(source, alias) for alias in getattr(source, "attribute_map", {})
                       if alias not in fields})
        return cls(source_model_type=source.model_type, gtakit_layers=layers, **fields, **kwargs)

    def source_config(self) -> PretrainedConfig:
        """The family's own config (a fresh object) with the source's fields."""
        fields = {k: v for k, v in self.to_dict().items() if k not in OWN_FIELDS}
        return AutoConfig.for_model(self.source_model_type, **fields)

    def layer_spec(self, index: int) -> dict:
        return self.gtakit_layers[index]

    @property
    def forms(self) -> list[str]:
        return [spec["form"] for spec in self.gtakit_layers]
