"""How closely SmolLM2-135M's conversions follow it, beyond perplexity: agreement with the source, long-context
passkey retrieval and a multiple-choice lm-evaluation-harness task built from the shipped text.

    python benchmarks/eval_quality.py                                      # default rows (slow on a CPU)
    python benchmarks/eval_quality.py --lengths 1024,2048 --windows 8 --mc-items 50   # quicker

Rows: the source; GTA at its default; GLA-3 and MLA at 50% of the source's KV elements (the `convert_quality.py`
settings), all `aware`-initialised from one calibration on the first 300,000 characters of WikiText-2. Scores on
text from character 400,000 on: mean KL(source || model) per token and top-1 agreement on `--windows` windows of
1024 tokens; passkey accuracy per prompt length over `--depths`; lm-eval accuracy on `gtakit_wiki_next`, a
4-way "which sentence comes next" task written from the evaluation text (seeded; no download).
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_text_split_arguments, calibration_and_eval_text, markdown_table  # noqa: E402
from convert_quality import budget_settings  # noqa: E402

from gtakit.convert.calibration import LayerwiseCalibrator, calibration_ids  # noqa: E402
from gtakit.convert.pipeline import convert_in_memory  # noqa: E402
from gtakit.convert import ConvertOptions  # noqa: E402
from gtakit.io.source import open_source  # noqa: E402
from gtakit.evaluate import agreement  # noqa: E402
from gtakit.evaluate.harness import run_tasks  # noqa: E402
from gtakit.evaluate.passkey import passkey  # noqa: E402
from gtakit.evaluate.stats import rate_with_interval  # noqa: E402

TASK = "gtakit_wiki_next"


def write_next_sentence_task(text: str, folder: Path, items: int, seed: int = 0) -> Path:
    """A 4-way multiple-choice task: given two consecutive sentences, pick the third among it and three
    sentences drawn from elsewhere in the text. Written as JSON lines plus an lm-eval task file."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if 40 <= len(s.strip()) <= 200]
    rng = random.Random(seed)
    rows = []
    for start in rng.sample(range(len(sentences) - 3), items):
        context, truth = " ".join(sentences[start : start + 2]), sentences[start + 2]
        choices = [truth] + [sentences[i] for i in rng.sample(range(len(sentences)), 3)]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "answer": choices.index(truth)})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\n"
    )
    return folder


def score(name: str, model, source_model, tokenizer, eval_text: str, task_dir: Path, args) -> dict:
    started = time.time()
    row: dict = {"model": name}
    measures = args.measures.split(",")
    if "agreement" in measures:
        agree = agreement(model, source_model, tokenizer, eval_text, args.windows * args.window, window=args.window)
        row.update(kl=round(agree["kl"], 4), top1=f"{agree['top1_agreement']:.1%}", ppl=round(agree["perplexity"], 3))
    if "passkey" in measures:
        lengths = tuple(int(n) for n in args.lengths.split(","))
        keys = passkey(model, tokenizer, lengths, tuple(float(d) for d in args.depths.split(",")), args.trials)
        row["passkey"] = keys
        for length in lengths:
            entry = keys["by_length"][length]
            row[f"pk{length}"] = rate_with_interval(entry["accuracy"], entry["interval"])
    if "tasks" in measures:
        results = run_tasks(model, tokenizer, [TASK], include_path=str(task_dir))["results"][TASK]
        row["mc_acc"] = f"{results['acc,none']:.1%}"
        row["mc_acc_norm"] = f"{results['acc_norm,none']:.1%}"
    row["seconds"] = round(time.time() - started)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_split_arguments(parser, windows=16)
    parser.set_defaults(calib_tokens=65_536)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--depths", default="0,0.5,1")
    parser.add_argument("--trials", type=int, default=4, help="keys per depth")
    parser.add_argument("--mc-items", type=int, default=100)
    parser.add_argument("--forms", default="gta,gla,mla")
    parser.add_argument("--measures", default="agreement,passkey,tasks", help="which columns to measure")
    parser.add_argument("--json", default="benchmarks/out/eval_quality.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    calib_path, eval_text = calibration_and_eval_text(args.text, args.json, args.calib_chars, args.eval_from_char)
    task_dir = write_next_sentence_task(eval_text, Path(args.json).parent / "eval_tasks", args.mc_items)
    source = open_source(None)
    tokenizer = source.load_tokenizer()
    source_model = source.load_model()
    d, G = source.config.head_dim, source.config.num_key_value_heads
    half = G * d  # 50% of the source's 2 * G * d elements per token and layer

    columns = [("model", "model"), ("kl", "KL(src||model)"), ("top1", "top-1 agree"), ("ppl", "perplexity")]
    columns += [(f"pk{n}", f"passkey {n}") for n in args.lengths.split(",")]
    columns += [("mc_acc", f"{TASK} acc"), ("mc_acc_norm", "acc_norm"), ("seconds", "s")]
    rows = [score("source (GQA)", source_model, source_model, tokenizer, eval_text, task_dir, args)]
    print(markdown_table(rows, columns), flush=True)

    ids = calibration_ids(source, str(calib_path), args.calib_tokens, 2048)
    calibrator = LayerwiseCalibrator(source, ids)
    stats = [calibrator(i) for i in range(source.config.num_hidden_layers)]
    forms = args.forms.split(",")
    settings = [("GTA default", {"target": "gta"})] if "gta" in forms else []
    settings += [("GLA-3 50%", budget_settings("gla", half, 3, d))] if "gla" in forms else []
    settings += [("MLA 50%", budget_settings("mla", half, 1, d))] if "mla" in forms else []
    for label, setting in settings:
        options = ConvertOptions(init="aware", **{k: v for k, v in setting.items() if not (
            k == "latent_heads" and setting["target"] == "mla")})
        model, _ = convert_in_memory(source, options, stats_for_layer=lambda i: stats[i])
        rows.append(score(label, model, source_model, tokenizer, eval_text, task_dir, args))
        print(markdown_table(rows[-1:], columns), flush=True)
        del model

    table = markdown_table(rows, columns)
    print("\n" + table)
    payload = {"command": " ".join(sys.argv), "machine": f"{torch.get_num_threads()} CPU threads, torch "
               f"{torch.__version__}", "calibration_tokens": int(ids.numel()), "rows": rows, "table": table}
    Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
