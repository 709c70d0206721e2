"""Reading the user's text files (calibration, evaluation, training data): UTF-8 or a clear refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from gtakit.errors import GtakitError

JSON_LINES_SUFFIXES = (".jsonl", ".json")
BINARY_PROBE = 1 << 16  # a NUL byte in the first 64 KiB: not a text file


def _read_head(path: Path, option: str, size: int | None) -> bytes:
    if path.is_dir():
        raise GtakitError(f"{option} {path} is a folder; give a text file")
    if not path.is_file():
        raise GtakitError(f"{option} {path} does not exist")
    try:
        with path.open("rb") as handle:
            raw = handle.read() if size is None else handle.read(size)
    except OSError as err:
        raise GtakitError(f"{option} {path} cannot be read: {err.strerror}") from None
    if b"\x00" in raw[:BINARY_PROBE]:
        raise GtakitError(f"{option} {path} is a binary file, not text; give a UTF-8 text or JSON lines file")
    return raw


def check_text_file(path: str | Path, option: str) -> None:
    """Cheap early check (exists, is a file, readable, not binary) before hours of work that end in reading it."""
    _read_head(Path(path).expanduser(), option, BINARY_PROBE)


def read_text_file(path: str | Path, option: str) -> str:
    """The whole file as UTF-8 text. `option` names where the path came from (e.g. '--calib') in the messages."""
    path = Path(path).expanduser()
    raw = _read_head(path, option, None)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GtakitError(
            f"{option} {path} is not UTF-8 text (invalid byte at offset {err.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8"
        ) from None


def iter_json_lines(raw: str, path: Path, field: str) -> Iterator[str]:
    """The `field` of every non-empty JSON line."""
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield str(json.loads(line)[field])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GtakitError(f"{path}:{number} is not a JSON object with a {field!r} field") from None


def read_text(path: str | Path, option: str = "--text", field: str = "text") -> str:
    """Plain text, or JSON lines with a `field` (joined with blank lines)."""
    path = Path(path).expanduser()
    raw = read_text_file(path, option)
    if path.suffix in JSON_LINES_SUFFIXES:
        return "\n\n".join(iter_json_lines(raw, path, field))
    return raw


def iter_dataset_texts(spec: str, text_field: str = "text", option: str = "--calib") -> Iterator[str]:
    """The `text_field` of every row of a `datasets` dataset named `NAME[:CONFIG[:SPLIT]]` (streamed, so only what
    is read is downloaded); a missing package or a network/dataset error is one line."""
    try:
        import datasets
    except ImportError:
        raise GtakitError(f"{option} {spec!r} is not a file; to read a datasets name, pip install datasets") from None
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        for row in datasets.load_dataset(name, config or None, split=split or "train", streaming=True):
            yield str(row.get(text_field) or "")
    except GtakitError:
        raise
    except Exception as err:  # noqa: BLE001 - network / dataset errors become one line for the user
        raise GtakitError(f"cannot read dataset {spec!r}: {str(err).splitlines()[0] if str(err) else err}") from None
