"""Where the portable DeepSeek-V3 export's distance to gtakit's MLA comes from: the absorbed q/k biases alone, or
the latent norm's refit on top of them.

    python benchmarks/export_error_sources.py benchmarks/out/qwen25/mla50-grid-code \
        --calib out/text/code-calib.txt --held code=out/text/code-heldout.txt \
        --held prose=benchmarks/out/qwen25/text/wiki-heldout.txt

The portable variant (`--latent-norm refit`) makes two approximations, both fitted on calibration text: the
format has no attention biases, so the query, latent and RoPE-key biases are absorbed into the weights by least
squares on the attention inputs; and the format's RMSNorm on the latent is met by refitting the up-projection on
normalised latents. This script fits both on the same calibration rows the export uses (`collect_moments`, the
last row held out as the export does), then scores against gtakit's MLA on held-out text of each domain:

* biases absorbed: gtakit's own MLA with the three biases folded into the weights and nothing else changed;
* the whole portable export: the DeepSeek-V3 tensors written to a temporary folder and loaded in transformers.

The first isolates the bias absorption; the rest of the second's distance is the norm refit (KL is not additive,
so the split is indicative). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

from gtakit.convert.calibration import text_ids  # noqa: E402
from gtakit.convert.export import CHECK_ROWS  # noqa: E402
from gtakit.evaluate import token_windows, window_agreement  # noqa: E402
from gtakit.formats import deepseek_v3, latent_norm  # noqa: E402
from gtakit.io.text import read_text  # noqa: E402


def biases_absorbed(model, moments: list) -> torch.nn.Module:
    """A copy of the gtakit MLA with its query, latent and RoPE-key biases folded into the weights by the export's
    least squares (`latent_norm.absorb_bias`), the biases removed."""
    variant = copy.deepcopy(model)
    for attn, layer_moments in zip(deepseek_v3.attention_modules(variant), moments):
        for proj in (attn.q_proj, attn.kv_down_proj, attn.k_rope_proj):
            if proj.bias is None:
                continue
            weight = latent_norm.absorb_bias(proj.weight.double(), proj.bias.double(), layer_moments)
            proj.weight.copy_(weight.to(proj.weight.dtype))
            proj.bias.zero_()
    return variant


def portable_export(model, moments: list, folder: Path) -> torch.nn.Module:
    from transformers import DeepseekV3ForCausalLM

    deepseek_v3.write_deepseek_v3(model, folder, torch.float32, "refit", moments)
    return DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a gtakit MLA folder (the export's input)")
    parser.add_argument("--calib", required=True, help="the text the export fits on")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="as the export's --calib-tokens")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--held", action="append", required=True, help="NAME=FILE, held-out text to score on")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/export_error_sources.json"))
    args = parser.parse_args()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = text_ids(tokenizer, args.calib, args.calib_tokens, args.seq_len)
    fit = ids[:-CHECK_ROWS]  # the rows the export fits on (it holds out the last ones to check itself)
    moments = deepseek_v3.collect_moments(model, fit, "refit", print)
    held = {name: token_windows(tokenizer, read_text(path), args.eval_tokens, args.window)
            for name, path in (item.split("=", 1) for item in args.held)}
    results: dict = {"model": str(args.model), "calib": args.calib, "fit_tokens": int(fit.numel()), "rows": []}
    variant = biases_absorbed(model, moments)
    score(results, "biases absorbed (gtakit MLA, nothing else changed)", variant, model, held)
    del variant
    with tempfile.TemporaryDirectory() as folder:
        exported = portable_export(model, moments, Path(folder))
        score(results, "the whole portable export (DeepSeek-V3 in transformers)", exported, model, held)
    results["wall_time_s"] = round(time.time() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    columns = [("variant", "variant")] + [(f"{name} {key}", f"{name} {key}")
                                          for name in held for key in ("KL", "top-1")]
    print(markdown_table(results["rows"], columns))


def score(results: dict, label: str, model, reference, held: dict) -> None:
    row = {"variant": label}
    for name, windows in held.items():
        agreement = window_agreement(model, reference, windows)
        row[f"{name} KL"] = round(agreement["kl"], 4)
        row[f"{name} top-1"] = f"{agreement['top1_agreement']:.1%}"
    print(row, flush=True)
    results["rows"].append(row)


if __name__ == "__main__":
    main()
