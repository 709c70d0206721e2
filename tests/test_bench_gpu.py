"""`gtakit bench gpu`: the dry run end to end through the CLI, step time limits, goals, the carry split.

No torch import at module level: the time-limit test's step functions are imported by the fork server's children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gtakit.bench import gpu, gpu_prepare
from gtakit.bench.gpu_steps import StepContext

pytestmark = pytest.mark.slow  # dry runs of the whole GPU check script (subprocesses)


ROOT = Path(__file__).resolve().parents[1]
FILES = ["env", "tests", "decode", "generate", "calibration", "uptrain", "results"]


def _bench(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the dry run sets it; a real run must not inherit it
    return subprocess.run([sys.executable, "-m", "gtakit", "bench", "gpu", "--out", str(out), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_every_step_ok(tmp_path):
    out = tmp_path / "gpu"
    done = _bench(out, "--dry-run", "--budget-s", "240")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(s["name"], s["status"]) for s in results["steps"]] == [(n, "ok") for n in FILES[:-1]]
    assert {p.name for p in out.iterdir()} == {f"{n}.json" for n in FILES} | {"results.md"}
    assert len(list(out.iterdir())) <= 8  # what comes back from the device machine
    assert results["meta"]["dry_run"] and results["meta"]["torch"]
    assert all(g["measured"] is None for g in results["goals"])  # no timing claims from a dry run
    decode = json.loads((out / "decode.json").read_text())
    assert {r["layout"] for r in decode["rows"]} == {"contiguous", "paged"}
    assert {r["method"] for r in decode["rows"]} >= {"gta", "gla2", "mla", "gqa_sdpa", "mla_torch"}
    generate = json.loads((out / "generate.json").read_text())
    assert {r["model"] for r in generate["rows"]} == {"source", "gta", "gla3", "mla"}
    assert all(f["max_batch"] >= 1 for f in generate["fits"])
    assert json.loads((out / "calibration.json").read_text())["compare"]["equal"]
    assert json.loads((out / "uptrain.json").read_text())["steps"] >= 2
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("## GPU validation") and "| uptrain | ok |" in markdown
    assert "| env | ok |" in done.stdout


def stall(ctx: StepContext) -> None:
    ctx.record(started=True)
    time.sleep(600)


def quick(ctx: StepContext) -> None:
    ctx.record(summary="done")


def fail(ctx: StepContext) -> None:
    raise RuntimeError("boom")


def test_step_past_its_limit_is_timed_out_and_later_steps_run(tmp_path):
    steps = [gpu.Step("stall", stall, 1.0), gpu.Step("boom", fail, 1.0), gpu.Step("after", quick, 1.0)]
    start = time.monotonic()
    entries = gpu.run_steps(steps, dict(dry_run=True), tmp_path, budget_s=45, preload=["gtakit.bench.gpu"],
                            echo=lambda _: None)
    assert time.monotonic() - start < 90
    assert [e["status"] for e in entries] == ["timed out", "failed", "ok"]
    assert entries[0]["result"] == {"started": True}  # what it recorded before it was killed stays
    assert "boom" in entries[1]["result"]["error"] and "RuntimeError" in entries[1]["log_tail"]
    assert entries[2]["result"]["summary"] == "done"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["timed out", "failed", "ok"]


def test_unknown_step_is_refused(tmp_path):
    assert gpu.main(["--steps", "decode,nope", "--out", str(tmp_path)]) == 2


def test_goals_from_measured_rows():
    decode = [dict(layout="contiguous", batch=8, context=8192, q_len=q, method=m, ms=ms, gbps=gbps, speedup=sp)
              for q, m, ms, gbps, sp in [(1, "gta", 0.5, 2800.0, "1.70x"), (4, "gla2", 0.4, 2900.0, "2.0x"),
                                         (4, "mla", 0.5, 2850.0, "1.9x"), (1, "gqa_sdpa", 0.85, 2500.0, "1.00x")]]
    generate = [dict(model="gla3", batch=32, context=8192, speedup="1.45x")]
    entries = [dict(name="decode", result=dict(copy_gbps=3000.0, rows=decode)),
               dict(name="generate", result=dict(rows=generate))]
    found = {g["goal"].split(" ")[0] + g["goal"].split(" ")[1]: (g["measured"], g["met"]) for g in gpu.goals(entries)}
    assert found["decodekernels"] == (0.933, "yes")
    assert found["GTA>="] == (1.7, "yes")
    assert found["GLA-2faster"] == (1.25, "yes")
    assert found["generateGLA-3"] == (1.45, "yes")
    assert found["generateMLA"] == (None, "")


def test_split_file_joins_back(tmp_path):
    blob = os.urandom(1000)
    (tmp_path / "model.gguf").write_bytes(blob)
    parts = [tmp_path / "a" / "model.gguf.1", tmp_path / "b" / "model.gguf.2"]
    assert gpu_prepare.split_file(tmp_path / "model.gguf", parts) == [500, 500]
    assert b"".join(p.read_bytes() for p in parts) == blob


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_decode_step_on_gpu(tmp_path):
    done = _bench(tmp_path, "--steps", "env,decode", "--budget-s", "280", timeout=400)
    assert done.returncode == 0, done.stdout[-3000:]
    assert json.loads((tmp_path / "decode.json").read_text())["copy_gbps"] > 0
