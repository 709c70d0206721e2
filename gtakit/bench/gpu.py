"""`gtakit bench gpu`: GPU validation in one run, each step in its own process under its own time limit.

Steps, in order: env (device and versions), tests (`pytest -m gpu`), decode (the Triton kernels against SDPA on the
GQA cache and the PyTorch absorbed MLA, contiguous and paged), generate (SmolLM2 against its GTA / GLA-3 / MLA
conversions at about 50% KV), calibration (CUDA statistics equal to the CPU's; one timed pass and one calibrated
conversion), uptrain (a bf16 burst of `gtakit finetune`'s trainer). Each step writes OUT/<step>.json as it goes;
a step that fails, hangs or outlives its limit is recorded as such and the next one runs. At the end: one table
on stdout, OUT/results.json and OUT/results.md (a section for benchmarks/RESULTS.md): 8 files, the most that
comes back from the device machine.

`--dry-run` runs every step on the CPU at tiny shapes (the kernels under TRITON_INTERPRET=1); `--prepare DIR`
writes what the GPU machine lacks (README: "GPU validation").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gtakit.bench import gpu_steps as steps
from gtakit.bench.tables import markdown_table

DEFAULT_BUDGET_S = 420  # one device call of 480 s leaves time in a 15-minute lease to rerun a step
MIN_STEP_S = 5.0
# Imported once by the fork server, so each step's child starts without re-importing torch (10 s on a busy CPU).
PRELOAD = ["torch", "triton", "transformers", "accelerate", "gtakit", "gtakit.kernels", "gtakit.bench.decode",
           "gtakit.bench.gpu_steps"]


@dataclass
class Step:
    name: str
    function: Callable[[steps.StepContext], None]
    share: float  # of the budget left when the step starts, relative to the shares of the steps left


STEPS = [
    Step("env", steps.step_env, 0.03),
    Step("tests", steps.step_tests, 0.14),
    Step("decode", steps.step_decode, 0.30),
    Step("generate", steps.step_generate, 0.25),
    Step("calibration", steps.step_calibration, 0.13),
    Step("uptrain", steps.step_uptrain, 0.15),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtakit bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu"), help="results folder")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of all steps")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny shapes (code paths only)")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset, in order")
    p.add_argument("--model", default=None, help="source: .gguf, HF folder, or a folder with only config.json and "
                   "tokenizer (random weights of that shape); default: the bundled SmolLM2-135M GGUF")
    p.add_argument("--text", default=None, help="calibration / uptraining text (plain text)")
    p.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                   help="write what the GPU machine lacks into DIR and print the commands; runs nothing")
    return p


def _context() -> multiprocessing.context.BaseContext:
    """A fork server when the platform has one: children fork from a process that never touched CUDA."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def _limits(selected: list[Step], index: int, remaining: float) -> float:
    return remaining * selected[index].share / sum(s.share for s in selected[index:])


def run_one(mp, step: Step, ctx: steps.StepContext, limit: float) -> dict:
    """Runs one step in a child process; kills it at `limit`. Returns its entry for results.json."""
    log_path = ctx.scratch / f"{step.name}.log"
    start = time.monotonic()
    child = mp.Process(target=steps.run_step, args=(step.function, ctx, log_path), name=f"gtakit-{step.name}")
    child.start()
    child.join(limit)
    status = "ok" if child.exitcode == 0 else "failed"
    if child.is_alive():
        child.kill()  # a hung kernel or an endless step: what it recorded so far stays
        child.join()
        status = "timed out"
    path = ctx.out / f"{step.name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    log = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
    return dict(name=step.name, status=status, seconds=round(time.monotonic() - start, 1), limit_s=round(limit, 1),
                exit_code=child.exitcode, result=result, log_tail=log)


def warm_up(mp, echo: Callable[[str], None]) -> None:
    """Starts the fork server (its preload imports) with a no-op child, so no step's limit pays for them."""
    start = time.monotonic()
    child = mp.Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    echo(f"== started the step server in {time.monotonic() - start:.1f} s")


def _step_entry(mp, step: Step, ctx: steps.StepContext, limit: float, echo: Callable[[str], None]):
    """(entry, the context later steps use): skipped when the budget is spent; env retried with spawn."""
    if limit < MIN_STEP_S:
        return dict(name=step.name, status="skipped (budget spent)", seconds=0, limit_s=0, result={}), mp
    echo(f"== {step.name} (limit {limit:.0f} s)")
    entry = run_one(mp, step, ctx, limit)
    if step.name == "env" and entry["status"] != "ok" and not ctx.dry_run and mp.get_start_method() != "spawn":
        # CUDA unseen from a forked child (a driver initialised before the fork): fresh interpreters from now on
        echo("-- env failed under the fork server; again with fresh interpreters (spawn)")
        mp = multiprocessing.get_context("spawn")
        entry = run_one(mp, step, ctx, max(limit, 60.0))
    return entry, mp


def run_steps(selected: list[Step], ctx_args: dict, out: Path, budget_s: float, preload: list[str] | None = None,
              echo: Callable[[str], None] = print, command: str = "") -> list[dict]:
    """Every step in order under its share of the budget left; results.json rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    mp = _context()
    if preload and hasattr(mp, "set_forkserver_preload"):
        mp.set_forkserver_preload(preload)
    entries: list[dict] = []
    deadline = time.monotonic() + budget_s
    warm_up(mp, echo)
    with tempfile.TemporaryDirectory(prefix="gtakit-bench-gpu-") as scratch:
        for index, step in enumerate(selected):
            (out / f"{step.name}.json").unlink(missing_ok=True)  # never report an earlier run's results
            limit = _limits(selected, index, deadline - time.monotonic())
            ctx = steps.StepContext(name=step.name, out=out, scratch=Path(scratch), **ctx_args)
            entry, mp = _step_entry(mp, step, ctx, limit, echo)
            entries.append(entry)
            echo(f"-- {step.name}: {entry['status']} in {entry['seconds']} s"
                 + (f"\n{entry.get('log_tail', '')[-1500:]}" if entry["status"] != "ok" else ""))
            write_results(out, entries, dict(ctx_args, command=command))
    return entries


# ------------------------------------------------------------------------------------------------ report


def _rows(entries: list[dict], step: str, key: str) -> list[dict]:
    return next((e["result"].get(key, []) for e in entries if e["name"] == step), [])


def goals(entries: list[dict]) -> list[dict]:
    """The issue's goals, each with what was measured (None: not measured in this run)."""
    decode = [r for r in _rows(entries, "decode", "rows") if isinstance(r.get("ms"), float)]
    long = [r for r in decode if r["context"] >= 8192]
    copy = next((e["result"].get("copy_gbps") for e in entries if e["name"] == "decode"), None)
    frac = [r["gbps"] / copy for r in long if r["method"] in ("gta", "gla2", "mla")] if copy else []
    gta = [float(r["speedup"][:-1]) for r in long if r["method"] == "gta" and r.get("speedup")]
    q4 = {(r["layout"], r["batch"], r["context"], r["method"]): r["ms"] for r in decode if r["q_len"] == 4}
    gla_vs_mla = [q4[k[:3] + ("mla",)] / v for k, v in q4.items() if k[3] == "gla2" and k[:3] + ("mla",) in q4]
    gen = {(r["model"], r["batch"], r["context"]): r.get("speedup") for r in _rows(entries, "generate", "rows")}

    def gen_speedup(model: str):
        value = gen.get((model, 32, 8192))
        return float(value[:-1]) if isinstance(value, str) else None

    def worst(values: list[float]):
        return round(min(values), 3) if values else None

    found = [("decode kernels >= 90% of copy bandwidth at context >= 8K (worst case)", worst(frac), 0.9),
             ("GTA >= 1.6x SDPA-GQA at context >= 8K (worst case)", worst(gta), 1.6),
             ("GLA-2 faster than MLA at q_len 4 (worst MLA/GLA-2 time ratio)", worst(gla_vs_mla), 1.0 + 1e-9),
             ("generate GLA-3 50% >= 1.3x source decode tok/s at 8K x 32", gen_speedup("gla3"), 1.3),
             ("generate MLA 50% >= 1.3x source decode tok/s at 8K x 32", gen_speedup("mla"), 1.3)]
    return [dict(goal=g, measured=m, met="" if m is None else ("yes" if m >= t else "no")) for g, m, t in found]


def goals_of_run(entries: list[dict], dry_run: bool) -> list[dict]:
    """No timing claims from a dry run: its goals are listed, unmeasured."""
    found = goals(entries)
    return [dict(g, measured=None, met="") for g in found] if dry_run else found


def describe_model(model: str | None, dry_run: bool) -> str:
    if model is None:
        return "tiny random Llama" if dry_run else "bundled SmolLM2-135M GGUF"
    path = Path(model)
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return f"random bf16 weights of {path}'s config"
    return model


def _meta(entries: list[dict], ctx_args: dict) -> dict:
    env = next((e["result"] for e in entries if e["name"] == "env"), {})
    keys = ("device", "capability", "memory_gib", "torch", "transformers", "triton", "cuda", "python", "gtakit")
    return dict({k: env.get(k) for k in keys}, dry_run=ctx_args["dry_run"],
                model=describe_model(ctx_args.get("model"), ctx_args["dry_run"]),
                date=time.strftime("%Y-%m-%d"), command=ctx_args.get("command", ""))


GOAL_COLUMNS = [("goal", "goal"), ("measured", "measured"), ("met", "met")]
STEP_COLUMNS = [("name", "step"), ("status", "status"), ("seconds", "s"), ("limit_s", "limit s"),
                ("summary", "result")]
GEN_COLUMNS = [("model", "model"), ("kv_bytes_per_token", "KV B/token"), ("batch", "batch"), ("context", "context"),
               ("decode_tok_s", "decode tok/s"), ("speedup", "vs source"), ("ms_per_step", "ms/step"),
               ("prefill_s", "prefill s"), ("peak_gib", "peak GiB")]
DECODE_COLUMNS = [("layout", "layout"), ("batch", "batch"), ("context", "context"), ("q_len", "q_len"),
                  ("method", "method"), ("ms", "ms"), ("gbps", "GB/s"), ("copy_frac", "of copy BW"),
                  ("speedup", "vs SDPA-GQA"), ("vs_mla_torch", "vs torch MLA")]


def step_table(entries: list[dict]) -> str:
    rows = [dict(e, summary=e["result"].get("summary") or e["result"].get("error", "")) for e in entries]
    return markdown_table(rows, STEP_COLUMNS)


def results_markdown(entries: list[dict], meta: dict) -> str:
    """A section ready for benchmarks/RESULTS.md."""
    title = "dry run on the CPU (code paths only, no timing claims)" if meta["dry_run"] else meta["device"]
    parts = [f"## GPU validation: `gtakit bench gpu` ({meta['date']}, {title})", "",
             f"Device {meta['device']} ({meta['memory_gib']} GiB); torch {meta['torch']}, transformers "
             f"{meta['transformers']}, triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}. "
             f"Model: {meta['model']}. Command: `{meta['command']}`.", "", step_table(entries), "",
             markdown_table(goals_of_run(entries, meta["dry_run"]), GOAL_COLUMNS)]
    generate = next((e["result"] for e in entries if e["name"] == "generate"), {})
    if generate.get("rows"):
        parts += ["", "`generate` (greedy, bf16; decode tok/s with the prefill taken out):", "",
                  markdown_table(generate["rows"], GEN_COLUMNS)]
    if generate.get("fits"):
        parts += ["", markdown_table(generate["fits"], [("model", "model"), ("context", "context"),
                                                       ("budget_gib", "budget GiB"), ("max_batch", "largest batch"),
                                                       ("max_batch_x_context", "batch x context")])]
    decode = _rows(entries, "decode", "rows")
    if decode:
        parts += ["", "Decode attention, one layer (H 32, d 128; GQA/GTA G 8, GLA-2 d_c 256, MLA d_c 512, d_r 64):",
                  "", markdown_table(decode, DECODE_COLUMNS)]
    return "\n".join(parts) + "\n"


def write_results(out: Path, entries: list[dict], ctx_args: dict) -> None:
    meta = _meta(entries, ctx_args)
    found = goals_of_run(entries, meta["dry_run"])
    (out / "results.json").write_text(json.dumps(dict(meta=meta, steps=entries, goals=found), indent=1, default=str))
    (out / "results.md").write_text(results_markdown(entries, meta))


# ------------------------------------------------------------------------------------------------ entry


def select_steps(names: str) -> list[Step]:
    by_name = {s.name: s for s in STEPS}
    wanted = [n for n in names.split(",") if n]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {list(by_name)}")
    return [s for s in STEPS if s.name in wanted]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prepare is not None:
        from gtakit.bench.gpu_prepare import prepare

        return prepare(args.prepare, text=args.text)
    try:
        selected = select_steps(args.steps)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        # The fork server imports the kernels: Triton reads this when they are decorated.
        os.environ["TRITON_INTERPRET"] = "1"
    # An import that asks torch.cuda.is_available() in the fork server must not initialise the driver there (its
    # forked children could not use CUDA): NVML answers instead.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx_args = dict(dry_run=args.dry_run, model=args.model, text=args.text)
    command = "gtakit bench gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    entries = run_steps(selected, ctx_args, args.out, args.budget_s, PRELOAD, command=command)
    print("\n" + step_table(entries))
    print("\n" + markdown_table(goals_of_run(entries, args.dry_run), GOAL_COLUMNS))
    print(f"\nwrote {args.out}/results.json and results.md")
    return 0 if all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
