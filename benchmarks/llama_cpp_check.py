"""Run a DeepSeek-V3 export in llama.cpp (through llama-cpp-python) and compare it with transformers.

    pip download --no-deps llama-cpp-python -d /tmp/llsdist && tar xzf /tmp/llsdist/llama_cpp_python-*.tar.gz -C /tmp
    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python     # builds llama.cpp (~15 min)
    python benchmarks/llama_cpp_check.py benchmarks/out/deepseek/128-64-spread-refit \
        --llama-cpp /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp --llama-python /tmp/llvenv/bin/python

1. llama.cpp's own converter (`convert_hf_to_gguf.py` of the llama.cpp that llama-cpp-python vendors) turns the
   export into an f32 GGUF. llama.cpp reads `q_lora_rank` as required unless the model has 26 or 27 layers; an
   export without the low-rank query path gets `q_lora_rank = 0` in the converter's copy of config.json, which
   llama.cpp takes as "plain q_proj" (only the converter sees that copy).
2. llama-cpp-python (in its own environment) computes the logits of every position of `--windows` windows of
   WikiText-2 text; transformers' `DeepseekV3ForCausalLM` computes them for the same token ids.
3. Printed and written as JSON: max |difference| of next-token log-probabilities, mean KL, top-1 agreement and
   both perplexities.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402

from gtakit.io.text import read_text  # noqa: E402

LLAMA_LOGITS = textwrap.dedent(
    """
    import sys, numpy as np
    from llama_cpp import Llama
    gguf, ids_path, out_path, threads = sys.argv[1:5]
    ids = np.load(ids_path)
    llm = Llama(model_path=gguf, n_ctx=int(ids.shape[1]), logits_all=True, n_threads=int(threads), verbose=False,
                n_batch=int(ids.shape[1]))
    rows = []
    for row in ids:
        llm.reset()
        llm.eval(row.tolist())
        rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    np.save(out_path, np.stack(rows))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="a DeepSeek-V3 folder written by gtakit (with its tokenizer)")
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (has convert_hf_to_gguf.py)")
    parser.add_argument("--llama-python", required=True, help="python of an environment with llama-cpp-python")
    parser.add_argument("--text", default=str(DATA))
    parser.add_argument("--from-char", type=int, default=400_000)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", default=None, help="default: EXPORT/llama_cpp_check.json")
    args = parser.parse_args()
    export = Path(args.export).resolve()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        started = time.time()
        gguf = to_gguf(export, Path(args.llama_cpp), work)
        convert_s = time.time() - started
        ids = text_ids(export, args)
        np.save(work / "ids.npy", ids.numpy())
        (work / "llama_logits.py").write_text(LLAMA_LOGITS)
        started = time.time()
        subprocess.run([args.llama_python, str(work / "llama_logits.py"), str(gguf), str(work / "ids.npy"),
                        str(work / "llama.npy"), str(torch.get_num_threads())], check=True)
        llama_s = time.time() - started
        theirs = torch.from_numpy(np.load(work / "llama.npy")).double()
    ours = transformers_logits(export, ids)
    result = compare(ours, theirs, ids)
    result.update(export=str(export), gguf_convert_s=round(convert_s, 1), llama_cpp_s=round(llama_s, 1),
                  tokens=int(ids.numel()), windows=args.windows, window=args.window, command=" ".join(sys.argv))
    print(json.dumps(result, indent=2))
    Path(args.json or export / "llama_cpp_check.json").write_text(json.dumps(result, indent=2))


def to_gguf(export: Path, llama_cpp: Path, work: Path) -> Path:
    """llama.cpp's converter on a copy of the folder (config.json adjusted for its q_lora_rank rule)."""
    staged = work / "hf"
    staged.mkdir()
    for path in export.iterdir():
        if path.is_file() and path.name != "config.json":
            os.symlink(path, staged / path.name)
    config = json.loads((export / "config.json").read_text())
    if config.get("q_lora_rank") is None and config["num_hidden_layers"] not in (26, 27):
        config["q_lora_rank"] = 0
    (staged / "config.json").write_text(json.dumps(config))
    out = work / "model.gguf"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(staged), "--outfile", str(out),
                    "--outtype", "f32"], check=True, env=env)
    return out


def text_ids(export: Path, args) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    text = read_text(args.text)[args.from_char :]
    ids = tokenizer(text[: args.windows * args.window * 8], add_special_tokens=False,
                    return_tensors="pt").input_ids[0]
    return ids[: args.windows * args.window].view(args.windows, args.window)


@torch.no_grad()
def transformers_logits(export: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    return torch.cat([model(input_ids=row[None]).logits for row in ids]).double()


def compare(ours: torch.Tensor, theirs: torch.Tensor, ids: torch.Tensor) -> dict:
    log_p, log_q = ours.log_softmax(-1), theirs.log_softmax(-1)
    targets = ids[:, 1:]

    def ppl(log_probs: torch.Tensor) -> float:
        return float(torch.exp(-log_probs[:, :-1].gather(-1, targets[..., None]).mean()))

    return {
        "max_abs_logprob_diff": float((log_p - log_q).abs().max()),
        "kl_per_token": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).double().mean()),
        "transformers_perplexity": ppl(log_p),
        "llama_cpp_perplexity": ppl(log_q),
    }


if __name__ == "__main__":
    main()
