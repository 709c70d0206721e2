"""Write code-domain text for calibration and held-out evaluation from the Python standard library's own source
(present on every machine, nothing downloaded): two disjoint sets of modules, chosen by a fixed list.

    python benchmarks/code_text.py out/text   # -> out/text/code-calib.txt, out/text/code-heldout.txt
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

# Disjoint module sets: calibration on one, evaluation on the other (a domain the model was not fitted on).
CALIB = ("argparse", "ast", "collections/__init__", "dataclasses", "difflib", "enum", "functools", "inspect",
         "json/decoder", "json/encoder", "logging/__init__", "pathlib", "pprint", "shutil", "string", "textwrap",
         "typing", "tempfile", "tokenize", "zipfile")
HELDOUT = ("asyncio/base_events", "asyncio/tasks", "calendar", "configparser", "csv", "email/message",
           "fractions", "heapq", "http/client", "ipaddress", "statistics", "subprocess", "threading", "urllib/parse")


def write(modules: tuple[str, ...], path: Path) -> int:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((root / f"{name}.py").read_text(encoding="utf-8") for name in modules)
    path.write_text(text, encoding="utf-8")
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for name, modules in (("code-calib.txt", CALIB), ("code-heldout.txt", HELDOUT)):
        print(f"{out / name}: {write(modules, out / name):,} characters")


if __name__ == "__main__":
    main()
