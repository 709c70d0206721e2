"""Helpers shared by the benchmark scripts: peak-memory sampling and markdown tables."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from gtakit.io.text import read_text
from gtakit.bench.tables import markdown_table  # noqa: F401  (re-exported for the scripts)


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"


def add_text_split_arguments(parser, windows: int) -> None:
    """The quality benchmarks' data options: calibrate on the first 300,000 characters of WikiText-2, evaluate
    on `--windows` windows of `--window` tokens from character 400,000 on."""
    parser.add_argument("--text", default=str(DATA))
    parser.add_argument("--calib-chars", type=int, default=300_000)
    parser.add_argument("--eval-from-char", type=int, default=400_000)
    parser.add_argument("--calib-tokens", type=int, default=262_144)
    parser.add_argument("--windows", type=int, default=windows)
    parser.add_argument("--window", type=int, default=1024)


def calibration_and_eval_text(text: str, out_json: str, calib_chars: int, eval_from_char: int) -> tuple[Path, str]:
    """Split a text file for the quality benchmarks: its first `calib_chars` characters are written beside the
    JSON output (calibration reads a file) and the evaluation text starts at `eval_from_char`, so the two spans
    never overlap. Returns (calibration file, evaluation text)."""
    full_text = read_text(text)
    calib_path = Path(out_json).parent / "calib.txt"
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    calib_path.write_text(full_text[:calib_chars])
    return calib_path, full_text[eval_from_char:]


class PeakRSS:
    """Context manager sampling this process's resident memory; `.peak_mb` after exit."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, psutil.Process().memory_info().rss / 2**20)


def finish_timing_table(rows: list[dict], columns: list[tuple[str, str]], json_path: str) -> None:
    """Print the whole table and write it as JSON with the command, torch's version and its thread count (the
    CPU speed benchmarks' common ending)."""
    table = markdown_table(rows, columns)
    print("\n" + table)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
                                           "torch": torch.__version__, "rows": rows, "table": table}, indent=2))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install 'gtakit[bench]' (matplotlib)")
        return None
    return plt
