"""`gtakit finetune` on a tiny converted model: learning, training modes, LoRA export, resume, distillation,
recipe validation, the shipped recipes and a two-process CPU run through `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from sources import VOCAB, tiny_tokenizer, write_source
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert
from gtakit.errors import GtakitError
from gtakit.finetune import finetune, list_recipes, load_recipe
from gtakit.finetune.data import RowSampler, pack_documents
from gtakit.finetune.modes import attention_matching, distillation_kl

pytestmark = pytest.mark.slow  # end-to-end training runs (two-process DDP among them)


runner = CliRunner()


def structured_text(docs: int = 160, seed: int = 0) -> str:
    """Documents made of a few fixed phrases: learnable in a few dozen steps, unlike uniform random words."""
    generator = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(3, VOCAB, (12,), generator=generator) for _ in range(4)]
    parts = []
    for _ in range(docs):
        picks = torch.randint(0, len(phrases), (4,), generator=generator)
        parts.append(" ".join(f"w{int(i)}" for p in picks for i in phrases[int(p)]))
    return "\n".join(parts)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared cores OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    write_source("llama-gqa-llama3rope", root / "source")
    options = ConvertOptions(target="gla", latent_heads=2, kv_rank="12", rope_dim="8")
    convert(str(root / "source"), root / "converted", options, progress=False)
    # one document per file: two files of structured text
    (root / "a.txt").write_text(structured_text(80, seed=1))
    (root / "b.txt").write_text(structured_text(80, seed=2))
    return root


def recipe_dict(root: Path, out: str, **sections) -> dict:
    base = {
        "model": {"path": str(root / "converted")},
        "data": {"train": [str(root / "*.txt")], "eval_sequences": 4},
        "train": {"max_steps": 30, "seq_len": 32, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2},
        "eval": {"every": 0, "batch": 4},
        "checkpoint": {"every": 0},
        "log": {"every": 0},
        "output": {"dir": str(root / out)},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def run(root: Path, out: str, **sections) -> dict:
    return finetune(load_recipe(recipe_dict(root, out, **sections)), progress=False)


def _ids(batch=2, length=20):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))


def test_loss_decreases_and_output_is_a_converted_folder(workdir):
    report = run(workdir, "full")
    losses = [r["loss"] for r in report["history"]]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    up = report["uptraining"]
    assert up["perplexity_after"] < 0.7 * up["perplexity_before"]
    out = workdir / "full"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_gtakit.py", "form_gla.py",
                 "README.md", "conversion.json", "recipe.yaml"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gtakit.GtakitForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()
    card = (out / "README.md").read_text()
    assert "## Uptraining" in card and "train:" in card and f"{up['perplexity_after']:.3f}" in card
    assert "zero-shot" not in card
    assert load_recipe(out / "recipe.yaml").train.max_steps == 30  # the embedded recipe is a valid recipe


def test_attention_mode_changes_only_attention_parameters(workdir):
    run(workdir, "attn", train={"mode": "attention", "max_steps": 4, "gradient_checkpointing": True})
    before = load_file(workdir / "converted" / "model.safetensors")
    after = load_file(workdir / "attn" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    attention = {name for name in before if ".self_attn." in name}
    assert changed == attention


def test_lora_export_is_merged_and_matches_base_plus_adapter(workdir):
    from peft import PeftModel

    run(workdir, "lora", train={"mode": "lora", "max_steps": 6, "lr": 1e-2}, lora={"r": 4, "alpha": 8.0})
    out = workdir / "lora"
    assert (out / "lora-adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert not any("lora" in name for name in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(workdir / "converted").eval()
    with torch.no_grad():
        untrained = base(_ids()).logits
        adapted = PeftModel.from_pretrained(base, out / "lora-adapter").eval()(_ids()).logits
        exported = merged(_ids()).logits
    assert (adapted - untrained).abs().max() > 1e-3  # the adapter learned something
    assert (exported - adapted).abs().max() < 1e-4


def test_resume_reproduces_uninterrupted_run(workdir):
    sections = dict(train={"max_steps": 8, "micro_batch": 2, "grad_accum": 2}, checkpoint={"every": 4},
                    eval={"every": 3})
    full = run(workdir, "straight", **sections)
    reference = full["history"]

    class Interrupt(Exception):
        pass

    def stop(step, record):
        if step == 5:  # one step past the checkpoint: that step is lost and redone
            raise Interrupt

    recipe = load_recipe(recipe_dict(workdir, "resumed", **sections))
    with pytest.raises(Interrupt):
        finetune(recipe, progress=False, callback=stop)
    assert not (workdir / "resumed").exists()
    resumed = finetune(recipe, resume=True, progress=False)
    history = resumed["history"]
    assert [r["step"] for r in history] == list(range(1, 9))
    for got, want in zip(history, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)
    assert resumed["uptraining"]["perplexity_after"] == pytest.approx(full["uptraining"]["perplexity_after"], rel=1e-5)


def test_distillation_loss_is_zero_when_student_is_teacher(workdir):
    logits = torch.randn(2, 7, VOCAB)
    assert distillation_kl(logits, logits.clone(), temperature=2.0).abs().item() < 1e-6
    assert distillation_kl(logits, torch.randn(2, 7, VOCAB), temperature=2.0).item() > 0.01
    # the student's own folder as teacher: the first step's KL (before any update) is zero
    report = run(workdir, "self-distill", train={"max_steps": 1},
                 loss={"kind": "distill", "temperature": 2.0}, teacher={"model": str(workdir / "converted")})
    first = report["history"][0]
    assert abs(first["kd"]) < 1e-6 and first["loss"] == first["kd"]
    assert report["uptraining"]["teacher_perplexity"] == pytest.approx(
        report["uptraining"]["perplexity_before"], rel=1e-5)


def test_mix_with_source_teacher_runs(workdir):
    report = run(workdir, "mix", train={"max_steps": 3}, loss={"kind": "mix", "distill_weight": 0.5},
                 teacher={"model": "source"})
    first = report["history"][0]
    assert first["kd"] > 0 and first["loss"] == pytest.approx(0.5 * first["ce"] + 0.5 * first["kd"], rel=1e-5)
    assert report["uptraining"]["teacher_perplexity"] is not None


def test_training_on_teacher_samples_alone_writes_them_once(workdir):
    """data.train empty: the teacher writes the rows; a second run reads them from data.cache_dir; with
    cross-entropy the teacher is dropped after writing."""
    messages: list[str] = []
    sections = dict(train={"max_steps": 3, "seq_len": 16}, teacher={"model": "source"},
                    data={"train": [], "teacher_samples": 400, "sample_length": 24, "eval_sequences": 2,
                          "cache_dir": str(workdir / "samples-cache")})
    raw = recipe_dict(workdir, "samples-only", **sections, loss={"kind": "distill"})
    raw["data"]["train"] = []
    report = finetune(load_recipe(raw), progress=False, log=messages.append)
    assert any("the teacher writes 400 tokens" in m for m in messages)
    assert report["history"][0]["kd"] > 0 and report["uptraining"]["teacher_perplexity"] is not None
    messages.clear()
    raw["output"]["force"] = True
    finetune(load_recipe(raw), progress=False, log=messages.append)
    assert not any("the teacher writes" in m for m in messages)  # the packed rows came from the cache
    raw = recipe_dict(workdir, "samples-ce", **sections, loss={"kind": "ce"})
    raw["data"]["train"] = []
    report = finetune(load_recipe(raw), progress=False)
    assert report["uptraining"]["teacher_perplexity"] is None and report["history"][0]["kd"] == 0


def test_bad_recipe_fails_up_front_with_one_line(workdir, tmp_path):
    path = tmp_path / "recipe.yaml"
    raw = recipe_dict(workdir, "never")
    raw["train"]["lr_peak"] = 1e-4
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["finetune", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'train.lr_peak'" in result.output and "Traceback" not in result.output

    del raw["train"]["lr_peak"]
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["finetune", str(path), "data.train=/no/such/file.txt"])
    assert result.exit_code == 2
    assert "data file /no/such/file.txt does not exist" in result.output
    result = runner.invoke(app, ["finetune", str(path), "train.micro_batch=four"])
    assert result.exit_code == 2 and "'train.micro_batch': expected int" in result.output
    result = runner.invoke(app, ["finetune", str(path), "loss.kind=distill"])
    assert result.exit_code == 2 and "needs a teacher" in result.output
    assert not (workdir / "never").exists() and not (workdir / "never.checkpoints").exists()


def test_packing_separates_documents_with_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = pack_documents(iter(["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]), tokenizer, seq_len=4)
    assert rows.tolist() == [[3, 4, 5, 2], [6, 7, 2, 8], [9, 10, 11, 2]]
    sampler = RowSampler(10, seed=3)
    # two processes read disjoint rows of the same global batch, and the order depends only on the step
    a = sampler.micro_batch_rows(2, 1, 2, 3, 0, 2)
    b = sampler.micro_batch_rows(2, 1, 2, 3, 1, 2)
    assert not set(a) & set(b) and RowSampler(10, seed=3).micro_batch_rows(2, 1, 2, 3, 0, 2) == a


def test_jsonl_and_parquet_data(workdir, tmp_path):
    from gtakit.finetune.data import _documents, resolve_files

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "w3 w4"}\n\n{"text": "w5"}\n')
    files = [jsonl]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["w6 w7", "w8"]}), tmp_path / "d.parquet")
        files.append(tmp_path / "d.parquet")
    except ImportError:
        pass
    docs = list(_documents(resolve_files([str(f) for f in files], "data.train"), "text", None))
    assert docs[:2] == ["w3 w4", "w5"] and (len(files) == 1 or docs[2:] == ["w6 w7", "w8"])


def test_overrides_and_shipped_recipes(workdir):
    recipe = load_recipe(recipe_dict(workdir, "x"), ["train.lr=5e-5", "train.tokens=1e6", "lora.target_modules=q_proj"])
    assert recipe.train.lr == 5e-5 and recipe.train.tokens == 1_000_000 and recipe.lora.target_modules == ["q_proj"]
    names = [name for name, _ in list_recipes()]
    for needed in ("smollm2-135m-gla3", "smollm2-135m-mla", "llama-3.2-1b-gta", "qwen2.5-7b-gla2", "accelerate/ddp",
                   "accelerate/fsdp"):
        assert needed in names
    result = runner.invoke(app, ["recipes", "list"])
    assert result.exit_code == 0 and "smollm2-135m-gla3" in result.output
    for name in names:
        if name.startswith("accelerate/"):
            continue
        text = runner.invoke(app, ["recipes", "show", name]).output
        assert text.startswith("#") and "gtakit convert" in text
        assert "gtakit finetune" in text or "-m gtakit.finetune" in text
        load_recipe(yaml.safe_load(text))  # every shipped recipe passes the schema


def _launch_two(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up (accelerate 1.x's
    # simple launcher); the torchrun-based launcher with the CPU forced really starts two (gloo).
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gtakit.finetune",
               str(recipe), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(checkpoint: Path) -> list[float]:
    return [r["loss"] for r in json.loads((checkpoint / "trainer_state.json").read_text())["trainer"]["history"]]


def test_two_process_cpu_run_matches_one_process_and_resumes(workdir):
    """2 processes x 2 sequences read the rows 1 process x 4 does: the same loss curve (gloo's all-reduce only
    reorders float sums), one output folder, one log, and a resume that reproduces the last step."""
    steps = {"max_steps": 3, "micro_batch": 2}
    path = workdir / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(workdir, "ddp", train=steps, checkpoint={"every": 2},
                                               recovery={"against": None})))
    done = _launch_two(path, "--quiet")
    assert done.stderr.count("accelerate: MULTI_CPU over 2 process(es)") == 1  # the main process logs alone
    report = json.loads((workdir / "ddp" / "conversion.json").read_text())["uptraining"]
    assert report["steps"] == 3 and report["tokens"] == 3 * 32 * 2 * 2  # two processes' batches per step
    model = AutoModelForCausalLM.from_pretrained(workdir / "ddp", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()
    checkpoints = workdir / "ddp.checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000003"]
    two = _losses(checkpoints / "step_00000003")
    one = run(workdir, "ddp-single", train={"max_steps": 3, "micro_batch": 4}, recovery={"against": None})
    assert [r["loss"] for r in one["history"]] == pytest.approx(two, rel=1e-5)

    import shutil

    shutil.rmtree(checkpoints / "step_00000003")
    path.write_text(yaml.safe_dump(recipe_dict(workdir, "ddp", train=steps, checkpoint={"every": 2},
                                               recovery={"against": None}, output={"force": True})))
    _launch_two(path, "--quiet", "--resume")
    assert _losses(checkpoints / "step_00000003") == pytest.approx(two, rel=1e-6)


def test_fsdp_config_wraps_the_family_decoder_layer(workdir):
    """accelerate's FSDP needs GPUs (on the CPU it runs DDP), so the wrap policy of recipes/accelerate/fsdp.yaml
    is checked without launching: no class is named, and accelerate takes the family's decoder layer from the
    converted model's `_no_split_modules`."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from gtakit.finetune import find_recipe

    config = yaml.safe_load(find_recipe("accelerate/fsdp").read_text())["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in config
    model = AutoModelForCausalLM.from_pretrained(workdir / "converted")
    layer_classes = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= layer_classes and "LlamaDecoderLayer" in model._no_split_modules
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in wrapped} == {"LlamaDecoderLayer"}


def test_recovery_distance_to_source_before_and_after(workdir, tmp_path):
    """Distillation from the source on one text brings the model closer to the source on another (held-out)
    text; both scores, where they were measured, and the card table are recorded."""
    other = tmp_path / "other.txt"
    other.write_text(structured_text(40, seed=9))
    report = run(workdir, "recovered", loss={"kind": "distill"}, teacher={"model": "source"}, train={"lr": 3e-4},
                 recovery={"text": [str(other)], "tokens": 256, "window": 32})
    recovery = report["uptraining"]["recovery"]
    assert recovery["text"] == [str(other)] and recovery["tokens"] == 256 and recovery["window"] == 32
    before, after = recovery["before"], recovery["after"]
    assert after["kl"] < before["kl"] and 0 <= after["top1_agreement"] <= 1
    assert after["source_perplexity"] == pytest.approx(before["source_perplexity"])
    card = (workdir / "recovered" / "README.md").read_text()
    assert "KL(source ‖ model)" in card and str(other) in card
    saved = json.loads((workdir / "recovered" / "conversion.json").read_text())["uptraining"]["recovery"]
    assert saved["after"]["kl"] == pytest.approx(after["kl"])


def test_recovery_defaults_to_eval_rows_and_can_be_switched_off(workdir):
    report = run(workdir, "recovery-default", train={"max_steps": 2})
    recovery = report["uptraining"]["recovery"]
    assert recovery["text"].startswith("data.eval") and recovery["tokens"] == 4 * 32
    off = run(workdir, "recovery-off", train={"max_steps": 2}, recovery={"against": None})
    assert off["uptraining"]["recovery"] is None


def test_recovery_text_must_exist(workdir, tmp_path):
    recipe = load_recipe(recipe_dict(workdir, "x", recovery={"text": [str(tmp_path / "missing.txt")]}))
    with pytest.raises(GtakitError, match="recovery.text"):
        finetune(recipe, progress=False)


def test_attention_matching_is_zero_against_itself_and_adds_to_the_loss(workdir):
    outputs = [torch.randn(2, 5, 8) for _ in range(3)]
    assert attention_matching(outputs, [o.clone() for o in outputs]).item() == 0.0
    assert attention_matching([2 * o for o in outputs], outputs).item() == pytest.approx(1.0)
    # the student's own folder as teacher: before any update its attention outputs are the teacher's
    report = run(workdir, "self-attn", train={"max_steps": 1}, teacher={"model": str(workdir / "converted")},
                 loss={"kind": "distill", "attention_weight": 1.0})
    assert abs(report["history"][0]["attention"]) < 1e-10
    # against the source, the converted attention differs: the term is positive and in the loss
    report = run(workdir, "source-attn", train={"max_steps": 2}, teacher={"model": "source"},
                 loss={"kind": "distill", "attention_weight": 0.5})
    first = report["history"][0]
    assert first["attention"] > 0
    assert first["loss"] == pytest.approx(first["kd"] + 0.5 * first["attention"], rel=1e-5)


def test_attention_matching_needs_the_teacher(workdir):
    with pytest.raises(GtakitError, match="attention_weight"):
        load_recipe(recipe_dict(workdir, "x", loss={"kind": "ce", "attention_weight": 1.0}))


def test_attention_matching_refuses_a_teacher_whose_layers_do_not_pair_up(workdir):
    write_source("llama-3-layers", workdir / "three-layers")
    with pytest.raises(GtakitError, match="attention_weight.*attention modules"):
        run(workdir, "unpaired", train={"max_steps": 1}, teacher={"model": str(workdir / "three-layers")},
            loss={"kind": "distill", "attention_weight": 1.0})
    assert not (workdir / "unpaired").exists()
