"""A user's files are never lost, nothing is left behind, and every failure is one line (tiny models, CPU)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from sources import random_text, write_source
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert
from gtakit.errors import GtakitError
from gtakit.io.output import STAGING_MARK, OutputFolder

runner = CliRunner()
TINY = ["--to", "gla", "--latent-heads", "2", "--kv-rank", "12", "--rope-dim", "8"]


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line(result, *fragments: str, after_work: bool = False) -> str:
    """Exit code 2 and the failure in one `error:` line. Refusals come before any work, so that line is all the
    output; failures `after_work` may follow progress messages but still end in that one line."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    if not after_work:
        assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "llama"
    write_source("llama-gqa-llama3rope", folder)
    return folder


@pytest.fixture
def src_copy(tmp_path, source) -> Path:
    import shutil

    return Path(shutil.copytree(source, tmp_path / "src"))


# ------------------------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_force_never_deletes_the_source(tmp_path, src_copy, where):
    out = src_copy if where == "itself" else src_copy.parent
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = cli("convert", src_copy, "-o", out, "--force", *TINY)
    assert_one_line(result, "holds the source model", "choose another -o")
    assert snapshot(tmp_path) == before


def test_force_never_deletes_the_calibration_text(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    calib = out / "calib.txt"
    calib.write_text(random_text(400))
    result = cli("convert", source, "-o", out, "--force", "--calib", calib, *TINY)
    assert_one_line(result, "holds the --calib text")
    assert calib.exists()


def test_output_follows_umask_and_replaces_old_content(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    old_umask = os.umask(0o022)
    try:
        convert(str(source), out, ConvertOptions(target="gla", latent_heads=2, kv_rank="12", rope_dim="8"),
                force=True, progress=False)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folders left


def test_symlinked_output_stays_a_link(tmp_path, source):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    convert(str(source), link, ConvertOptions(target="mla", kv_rank="12", rope_dim="8"), force=True, progress=False)
    assert link.is_symlink() and (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_output_that_cannot_be_renamed_is_written_in_place(tmp_path, source, monkeypatch):
    """-o . (the working directory) is staged inside OUT and moved up: the folder itself is never renamed."""
    out = tmp_path / "here"
    out.mkdir()
    (out / "old.bin").write_text("x")
    monkeypatch.chdir(out)
    inode = out.stat().st_ino
    convert(str(source), ".", ConvertOptions(target="mla", kv_rank="12", rope_dim="8"), force=True, progress=False)
    assert out.stat().st_ino == inode
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "old.bin" not in names
    assert not [n for n in names if n.startswith(".gtakit-tmp-")]


# ------------------------------------------------------------------------------------------- litter


def test_stale_staging_of_a_killed_run_is_removed(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd"
    stale.mkdir()
    (stale / STAGING_MARK).write_text(f"{os.uname().nodename} {dead.pid}\n")
    (stale / "model.safetensors").write_bytes(b"0" * 100)
    messages: list[str] = []
    OutputFolder(out, force=False, log=messages.append).check()
    assert not stale.exists()
    assert any("interrupted earlier run" in m for m in messages)


def test_staging_of_a_live_run_is_refused(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".out.tmp-{live.pid}-abcd"
        busy.mkdir()
        (busy / STAGING_MARK).write_text(f"{os.uname().nodename} {live.pid}\n")
        with pytest.raises(GtakitError, match=f"another gtakit run \\(pid {live.pid}\\)"):
            OutputFolder(out, force=False).check()
        assert busy.exists()
    finally:
        live.kill()


SLOW_CONVERT = """
import sys, time
from pathlib import Path
import gtakit.formats.folder as folder
real = folder.write_config
def slow(*args, **kwargs):  # the staging folder exists and holds the weights: wait to be killed
    real(*args, **kwargs)
    Path(sys.argv[3]).write_text("staged")
    time.sleep(120)
folder.write_config = slow
from gtakit.convert import ConvertOptions, convert
convert(sys.argv[1], sys.argv[2], ConvertOptions(target="mla", kv_rank="12", rope_dim="8"), progress=False)
"""


@pytest.mark.slow  # a conversion in a subprocess, killed
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_conversion_leaves_nothing_that_outlives_the_next_run(tmp_path, source, sig):
    out, flag = tmp_path / "out", tmp_path / "flag"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_CONVERT)
    proc = subprocess.Popen([sys.executable, str(script), str(source), str(out), str(flag)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert flag.exists(), proc.communicate()[1][-2000:]
    assert list(tmp_path.glob(".out.tmp-*")), "the staging folder should exist while converting"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    if sig == signal.SIGTERM:  # handled like Ctrl-C: cleaned at once
        assert not leftovers and not out.exists()
        return
    assert leftovers and not out.exists()  # SIGKILL cannot be handled; the next run cleans up
    messages: list[str] = []
    OutputFolder(out, force=False, log=messages.append).check()
    assert not list(tmp_path.glob(".out.tmp-*")) and messages


# ------------------------------------------------------------------------------------------- one line


def _bad_config(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda f: _bad_config(f, "[1, 2]"), "not a JSON object"),
        (lambda f: _bad_config(f, json.dumps({"model_type": "llama"})), "lacks hidden_size"),
        (lambda f: _bad_config(f, json.dumps({**json.loads((f / "config.json").read_text()), "hidden_size": 32})),
         "the weights and the config disagree"),
        (lambda f: [p.write_bytes(p.read_bytes()[:100]) for p in f.glob("*.safetensors")], "truncated or corrupt"),
    ],
)
def test_broken_sources_fail_in_one_line(tmp_path, src_copy, damage, fragment):
    damage(src_copy)
    result = cli("convert", src_copy, "-o", tmp_path / "out", *TINY)
    assert_one_line(result, fragment)
    assert not (tmp_path / "out").exists()


def test_calibration_without_tokenizer_fails_before_work(tmp_path, src_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src_copy / name).unlink(missing_ok=True)
    (tmp_path / "calib.txt").write_text(random_text(400))
    result = cli("convert", src_copy, "-o", tmp_path / "out", "--calib", tmp_path / "calib.txt", *TINY)
    assert_one_line(result, "no usable tokenizer")


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--max-shard-size", "5XB", "--max-shard-size '5XB' is not a size"),
        ("--max-shard-size", "0", "is not a size"),
        ("--calib-device", "gpu", "--calib-device must be"),
        ("--eval-tokens", "10", "--eval-tokens 10 is less than one --eval-window"),
        ("--eval-window", "1", "--eval-window must be at least 2"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, source, option, value, fragment):
    text = tmp_path / "eval.txt"
    text.write_text(random_text(400))
    before = snapshot(tmp_path)
    result = cli("convert", source, "-o", tmp_path / "out", "--eval-text", text, option, value, *TINY)
    assert_one_line(result, fragment)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["eval.txt"]


@pytest.mark.parametrize(
    "content, fragment",
    [(b"\x00\x01binary\x00", "is a binary file"), ("caf\xe9 latin-1".encode("latin-1"), "is not UTF-8 text")],
)
def test_text_that_is_not_utf8_is_refused(tmp_path, source, content, fragment):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    result = cli("convert", source, "-o", tmp_path / "out", "--eval-text", bad, *TINY)
    assert_one_line(result, "--eval-text", fragment)
    result = cli("eval", source, "--text", bad)
    assert_one_line(result, fragment)


def test_folder_given_as_text_file(tmp_path, source):
    result = cli("convert", source, "-o", tmp_path / "out", "--calib", tmp_path, *TINY)
    assert_one_line(result, "is a folder; give a text file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_parent(tmp_path, source):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_one_line(cli("convert", source, "-o", locked / "out", *TINY), "cannot write to")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("code, fragment", [("ENOSPC", "no space left"), ("EROFS", "cannot write to")])
def test_write_failures_are_one_line_and_leave_nothing(tmp_path, source, monkeypatch, code, fragment):
    """A disk that fills up, or a file system that turns read-only, while the shards are written."""
    import errno

    import gtakit.formats.shards as writer

    def failing(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(writer, "save_file", failing)
    result = cli("convert", source, "-o", tmp_path / "out", *TINY)
    assert_one_line(result, fragment, after_work=True)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_eval_of_broken_folders(tmp_path, src_copy):
    (tmp_path / "t.txt").write_text(random_text(400))
    (src_copy / "tokenizer.json").unlink()
    (src_copy / "tokenizer_config.json").unlink(missing_ok=True)
    assert_one_line(cli("eval", src_copy, "--text", tmp_path / "t.txt"), "cannot load")
    _bad_config(src_copy, "{not json")
    assert_one_line(cli("eval", src_copy, "--text", tmp_path / "t.txt"), "is not valid JSON")


def test_push_with_a_bad_repo_id_or_no_network(tmp_path, source, monkeypatch):
    folder = tmp_path / "out"
    convert(str(source), folder, ConvertOptions(target="mla", kv_rank="12", rope_dim="8"), progress=False)
    assert_one_line(cli("push", folder, "not a/valid//id"), "is not a valid Hub repo id")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like no network
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    assert_one_line(cli("push", folder, "user/model"), "upload to user/model failed")


# ------------------------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source) -> Path:
    root = tmp_path_factory.mktemp("ft")
    convert(str(source), root / "converted", ConvertOptions(target="gla", latent_heads=2, kv_rank="12", rope_dim="8"),
            progress=False)
    (root / "train.txt").write_text(random_text(3000))
    return root


def _recipe(root: Path, tmp: Path, **extra) -> Path:
    recipe = {
        "model": {"path": str(root / "converted")},
        "data": {"train": [str(root / "train.txt")], "eval_sequences": 2},
        "train": {"max_steps": 2, "seq_len": 16, "micro_batch": 2},
        "eval": {"every": 0, "batch": 2},
        "checkpoint": {"every": 1, "dir": str(tmp / "ckpt")},
        "log": {"every": 0},
        "output": {"dir": str(tmp / "out")},
    }
    for section, values in extra.items():
        recipe[section].update(values)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_finetune_never_deletes_files_in_the_checkpoint_folder(tmp_path, converted):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "my-notes.txt").write_text("mine")
    for extra in ({}, {"output": {"force": True}}):
        result = cli("finetune", _recipe(converted, tmp_path, **extra), "--quiet")
        assert_one_line(result, "holds files gtakit did not write")
        assert (tmp_path / "ckpt" / "my-notes.txt").read_text() == "mine"


def test_finetune_from_a_hub_id_while_offline(tmp_path, converted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("finetune", _recipe(converted, tmp_path), "--quiet", "model.path=someone/not-cached")
    assert_one_line(result, "'someone/not-cached' is not a local path and is not in the Hugging Face cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_finetune_hint_names_its_own_force_option(tmp_path, converted):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    result = cli("finetune", _recipe(converted, tmp_path), "--quiet")
    assert_one_line(result, "set output.force=true")


def test_failed_finetune_removes_the_checkpoint_folder_it_created(tmp_path, converted, monkeypatch):
    import gtakit.finetune.trainer as trainer

    def broken(*args, **kwargs):
        raise GtakitError("simulated failure before the first checkpoint")

    monkeypatch.setattr(trainer, "evaluate_perplexity", broken)
    result = cli("finetune", _recipe(converted, tmp_path), "--quiet")
    assert_one_line(result, "simulated failure", after_work=True)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


class _Marker:
    """Unpickling this creates a file: proof that a checkpoint file was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_does_not_unpickle_checkpoint_files(tmp_path, converted):
    import pickle

    recipe = _recipe(converted, tmp_path)
    first = cli("finetune", recipe, "--quiet", "train.max_steps=1")
    assert first.exit_code == 0, first.output
    (tmp_path / "out").rename(tmp_path / "first")
    step = sorted((tmp_path / "ckpt").glob("step_*"))[-1]
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)))
    (step / "random_states_0.pkl").write_bytes(payload)  # accelerate reads it with weights_only=True
    resumed = cli("finetune", recipe, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not marker.exists()
    state = json.loads((sorted((tmp_path / "ckpt").glob("step_*"))[-1] / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 2 and state["scheduler"]["last_epoch"] == 2

    # accelerate would unpickle custom objects with weights_only=False: gtakit writes none and refuses them
    last = sorted((tmp_path / "ckpt").glob("step_*"))[-1]
    (last / "custom_checkpoint_0.pkl").write_bytes(payload)
    (tmp_path / "out").rename(tmp_path / "second")
    refused = cli("finetune", recipe, "--quiet", "--resume", "train.max_steps=3")
    assert_one_line(refused, "custom_checkpoint_0.pkl", after_work=True)
    assert not marker.exists()


def test_finetune_output_mode_follows_umask(tmp_path, converted):
    old_umask = os.umask(0o022)
    try:
        result = cli("finetune", _recipe(converted, tmp_path), "--quiet")
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "recipe.yaml"]
    # accelerate's checkpoint and the exported model.safetensors were 0600 (safetensors' own mode)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for folder in ("ckpt", "out") for p in (tmp_path / folder).rglob("*") if p.is_file()}
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
    assert "out/model.safetensors" in modes


# ------------------------------------------------------------------------------------------- second pass (issue 32)


def _fill_shard_with(folder: Path, byte: bytes) -> None:
    """Keep each shard's safetensors header, overwrite its data (0xff bytes are NaN in every float dtype)."""
    import struct

    for shard in folder.glob("*.safetensors"):
        raw = shard.read_bytes()
        header = 8 + struct.unpack("<Q", raw[:8])[0]
        shard.write_bytes(raw[:header] + byte * (len(raw) - header))


def _as_model_type(folder: Path, model_type: str, architecture: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type,
                                                    "architectures": [architecture]}))


@pytest.mark.parametrize("where", ["text", "config", "folder", "missing"])
def test_eval_output_never_replaces_inputs_and_is_checked_first(tmp_path, src_copy, where, monkeypatch):
    """Item 1: --output over the --text file or into the model folder is refused, as is a folder or a path in a
    missing folder, before the model loads (nothing written, no stray temporary file)."""
    import gtakit.evaluate as evaluate

    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    (tmp_path / "results").mkdir()
    output = {"text": text, "config": src_copy / "config.json", "folder": tmp_path / "results",
              "missing": tmp_path / "nowhere" / "r.json"}[where]
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded before the --output check"))
    before = snapshot(tmp_path)
    result = cli("eval", src_copy, "--text", text, "--output", output)
    fragment = {"text": "is the --text file", "config": "is inside the model", "folder": "is a folder",
                "missing": "does not exist"}[where]
    assert_one_line(result, "--output", fragment)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["results", "src", "t.txt"]


def test_eval_output_is_written_whole(tmp_path, source):
    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    result = cli("eval", source, "--text", text, "--window", "32", "--output", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.txt"]


def test_non_finite_refit_ridge_is_refused(tmp_path, source):
    """Item 2: --refit-ridge inf wrote NaN o_proj weights and reported 'converted nan'."""
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(400))
    for value in ("inf", "nan", "-1"):
        result = cli("convert", source, "-o", tmp_path / "out", "--calib", calib, "--refit-ridge", value, *TINY)
        assert_one_line(result, "--refit-ridge must be")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, fragment", [
    ("train.grad_clip=-1", "'train.grad_clip' must be positive, got -1"),
    ("train.lr=nan", "'train.lr' must be a finite number"),
    ("train.warmup_steps=-5", "'train.warmup_steps' must be at least 0"),
    ("train.min_lr_ratio=5", "'train.min_lr_ratio' must be in [0, 1]"),
    ("eval.batch=0", "'eval.batch' must be at least 1"),
    ("lora.r=0", "'lora.r' must be at least 1"),
    ("train.betas=[0.9,1.5]", "'train.betas' must be in [0, 1)"),
])
def test_recipe_numbers_outside_their_range_are_refused(tmp_path, converted, override, fragment):
    """Item 3: every numeric recipe field declares its range; grad_clip=-1 trained uphill."""
    result = cli("finetune", _recipe(converted, tmp_path), "--quiet", "train.mode=lora", override)
    assert_one_line(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_weights_of_another_architecture_are_refused_everywhere(tmp_path, src_copy):
    """Items 5 and 10: Llama weights under model_type gemma2 loaded with random norms (eval printed a perplexity
    of 762145) and failed in convert with 'conversion produced no tensor'."""
    _as_model_type(src_copy, "gemma2", "Gemma2ForCausalLM")
    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    fragment = "the weights lack model.layers.0.post_feedforward_layernorm.weight"
    assert_one_line(cli("convert", src_copy, "-o", tmp_path / "out", "--to", "gta"), fragment)
    assert_one_line(cli("eval", src_copy, "--text", text), fragment)
    assert not (tmp_path / "out").exists()


def test_unexpected_weights_are_refused(tmp_path, src_copy):
    from safetensors.torch import save_file
    import torch

    save_file({"model.layers.0.mlp.extra.weight": torch.ones(2)}, src_copy / "extra.safetensors")
    (src_copy / "model.safetensors.index.json").unlink(missing_ok=True)
    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    assert_one_line(cli("eval", src_copy, "--text", text), "hold model.layers.0.mlp.extra.weight")
    assert_one_line(cli("convert", src_copy, "-o", tmp_path / "out", *TINY), "hold model.layers.0.mlp.extra.weight")


def test_non_finite_weights_are_refused_everywhere(tmp_path, src_copy, converted):
    """Item 5: a shard of garbage bytes under a valid header gave NaN weights that convert copied and eval reported
    as 'perplexity nan'; uptraining or exporting them is refused the same way."""
    import shutil

    _fill_shard_with(src_copy, b"\xff")
    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    assert_one_line(cli("convert", src_copy, "-o", tmp_path / "out", *TINY), "holds NaN or infinite values")
    assert_one_line(cli("eval", src_copy, "--text", text), "holds NaN or infinite values")
    broken = Path(shutil.copytree(converted / "converted", tmp_path / "converted"))
    _fill_shard_with(broken, b"\xff")
    assert_one_line(cli("eval", broken, "--text", text), "holds NaN or infinite values")
    ft = tmp_path / "ft"
    ft.mkdir()
    result = cli("finetune", _recipe(converted, ft), "--quiet", f"model.path={broken}")
    assert_one_line(result, "model.path", "holds NaN or infinite values")
    assert not (tmp_path / "out").exists() and not (ft / "out").exists() and not (ft / "ckpt").exists()


def test_explicit_default_width_plans_the_default_model(source):
    """Item 7: giving the default --kv-rank changed the default --rope-dim (it was derived from the given width)."""
    from dataclasses import replace

    from gtakit.convert import open_convertible
    from gtakit.convert.plan import plan_conversion
    from gtakit.families import family_of

    opened = open_convertible(source)
    family = family_of(opened.config)
    default = ConvertOptions(target="gla")
    spec = plan_conversion(opened, family, default).layers[0].spec
    for name, key in (("kv_rank", "kv_lora_rank"), ("rope_dim", "qk_rope_head_dim")):
        explicit = plan_conversion(opened, family, replace(default, **{name: str(spec[key])})).layers[0].spec
        assert explicit == spec, name


@pytest.mark.parametrize("args, fragment", [
    (["--layer", "0:latent_heads=two"], "latent_heads must be a whole number, got 'two'"),
    (["--layer", "0:groups=1.5"], "groups must be a whole number"),
    (["--layer", "0:maps=abc"], "maps must be a whole number"),
    (["--layer", "0:kv_rank=abc"], "--layer '0:kv_rank=abc': kv_rank must be a whole number or 'full'"),
    (["--layer", "1-0:source"], "the range 1-0 is reversed"),
    (["--layer", "0-1:kv_rank=8", "--layer", "1:kv_rank=12"], "both set kv_rank of layer 1"),
    (["--layer", "0:kv_rank=8,kv_rank=12"], "kv_rank is given twice"),
    (["--key-norm", "bogus"], "--key-norm must be one of cached, mean"),
    (["--rope-rotation-credit", "1.5"], "--rope-rotation-credit must be"),
    (["--key-norm", "mean"], "--key-norm mean folds the calibrated mean key norm"),
    (["--layer", "0:key_norm=cached,to=mla", "--key-norm", "mean"], "pass --calib"),
    (["--to", "ghla", "--ghla-query", "fit"], "--ghla-query fit fits the map queries on calibration text"),
    (["--refit", "none", "--refit-ridge", "0.5"], "--refit-ridge sets the output refit, which --refit none turns off"),
    (["--refit-tokens", "-1"], "--refit-tokens must be at least 0"),
    (["--calib-tokens", "10"], "--calib-tokens must be at least 1024, got 10"),
])
def test_bad_convert_options_are_refused_before_the_output_is_looked_at(tmp_path, source, args, fragment):
    """Items 10 and 11 (and the message order): accepted silently, a TypeError, or 'output folder not empty'
    reported before the option error."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    assert_one_line(cli("convert", source, "-o", tmp_path / "out", *args), fragment)
    assert (tmp_path / "out" / "mine.txt").read_text() == "mine"


def test_key_norm_on_a_source_without_qk_norm_is_refused(tmp_path, source):
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(400))
    result = cli("convert", source, "-o", tmp_path / "out", "--calib", calib, "--layer", "0:key_norm=mean", *TINY)
    assert_one_line(result, "--key-norm (--layer 0) applies to sources with QK-norm")


def test_converting_a_converted_folder_says_so(tmp_path, converted):
    result = cli("convert", converted / "converted", "-o", tmp_path / "out", *TINY)
    assert_one_line(result, "already a gtakit conversion")


def test_against_and_teacher_with_another_vocabulary_are_refused(tmp_path, converted):
    """Item 10: --against a model with another vocabulary raised RuntimeError/IndexError; a teacher with a smaller
    one an IndexError, a larger one was silently cut."""
    other = tmp_path / "other"
    write_source("llama-mha", other)
    config = json.loads((other / "config.json").read_text())
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(other / "model.safetensors") if (other / "model.safetensors").exists() else None
    if tensors is None:  # sharded: rewrite as one file with a larger vocabulary
        tensors = {}
        for shard in sorted(other.glob("*.safetensors")):
            tensors.update(load_file(shard))
            shard.unlink()
        (other / "model.safetensors.index.json").unlink()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], tensors[name][:3]])
    save_file(tensors, other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 3}))
    text = converted / "train.txt"
    result = cli("eval", converted / "converted", "--text", text, "--against", other)
    assert_one_line(result, "--against", "has a vocabulary of 100 tokens")
    ft = tmp_path / "ft"
    ft.mkdir()
    result = cli("finetune", _recipe(converted, ft), "--quiet", "loss.kind=distill", f"teacher.model={other}")
    assert_one_line(result, "teacher.model", "vocabulary of 100 tokens")


def test_export_refuses_bad_shard_size_before_work(tmp_path, converted):
    calib = converted / "train.txt"
    for value in ("banana", "0"):
        result = cli("export", converted / "converted", "-o", tmp_path / "out", "--calib", calib,
                     "--max-shard-size", value)
        assert_one_line(result, "--max-shard-size")
    assert not (tmp_path / "out").exists()


def test_logged_learning_rate_is_the_one_each_step_trains_at(tmp_path, converted):
    """Item 8: the lr logged at step N was step N+1's, step 1 trained at lr 0, and a warm-up longer than the run
    passed without a word."""
    from gtakit.finetune import load_recipe
    from gtakit.finetune.trainer import finetune

    recipe = load_recipe(_recipe(converted, tmp_path), ["train.max_steps=3", "train.warmup_steps=2",
                                                        "train.schedule=constant", "train.lr=1e-3"])
    report = finetune(recipe, progress=False)
    assert [round(r["lr"], 12) for r in report["history"]] == [5e-4, 1e-3, 1e-3]
    messages: list[str] = []
    recipe = load_recipe(_recipe(converted, tmp_path), ["train.max_steps=1", "train.warmup_steps=4",
                                                        "output.force=true"])
    finetune(recipe, progress=False, log=messages.append)
    assert any("warning: train.warmup_steps 4 is longer than the run's 1 steps" in m for m in messages), messages


def test_resume_with_a_changed_learning_rate_is_refused(tmp_path, converted):
    """Item 4: --resume with a new train.lr kept the old rate but recorded the new one."""
    recipe = _recipe(converted, tmp_path)
    first = cli("finetune", recipe, "--quiet", "train.max_steps=1")
    assert first.exit_code == 0, first.output
    before = snapshot(tmp_path)
    result = cli("finetune", recipe, "--quiet", "--resume", "train.lr=5e-3")
    assert_one_line(result, "train.lr stays 0.0001", "output.force=true")
    assert snapshot(tmp_path) == before


def test_interrupted_finetune_says_its_checkpoints_were_kept(tmp_path, converted, capsys):
    from gtakit.errors import one_line_errors
    from gtakit.finetune import load_recipe
    from gtakit.finetune.trainer import finetune

    def stop(step, record):
        raise KeyboardInterrupt

    recipe = load_recipe(_recipe(converted, tmp_path))
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        finetune(recipe, progress=False, callback=stop)
    assert stopped.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted") and "were kept: continue with --resume" in line, line
    assert list((tmp_path / "ckpt").glob("step_*"))


def test_sequences_past_the_model_positions(tmp_path):
    """Item 9: GPT-2 (learned positions) with the default --calib-seq-len 2048 crashed in the family adapter; eval
    with a window past its positions likewise. The default now calibrates on the model's length, a longer window
    is refused; a RoPE model past its context gets a warning."""
    gpt2 = tmp_path / "gpt2"
    write_source("gpt2", gpt2)  # 256 positions
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(3000))
    result = cli("convert", gpt2, "-o", tmp_path / "out", "--to", "mla", "--kv-rank", "12", "--calib", calib,
                 "--calib-tokens", "2048", "--quiet")
    assert result.exit_code == 0, result.output
    assert "calibrating on sequences of 256 tokens" in result.output
    result = cli("convert", gpt2, "-o", tmp_path / "out2", "--to", "mla", "--calib", calib, "--calib-seq-len", "512")
    assert_one_line(result, "--calib-seq-len 512 exceeds the model's 256 learned positions")
    assert_one_line(cli("eval", gpt2, "--text", calib, "--window", "512"), "--window 512 exceeds", after_work=True)
    result = cli("eval", tmp_path / "out", "--text", calib, "--window", "512")  # after loading, before measuring
    assert_one_line(result, "--window 512 exceeds the model's 256 learned positions", after_work=True)


# ------------------------------------------------------------------------------------------- second pass, leftovers


def test_refit_tokens_are_exactly_the_first_n():
    """Item 6: --refit-tokens N summed whole micro-batches (N = 5, 256, 512, 2048 gave the same weights, and CPU
    and CUDA batch differently); now exactly the first N tokens, row by row, and the count is reported."""
    from gtakit.convert.refine import output_moments

    o_proj = torch.nn.Linear(6, 4, bias=False)

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = o_proj

        def forward(self, x):
            return self.o_proj(x)

    xs = [torch.randn(2, 100, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ys = [torch.randn(2, 100, 4, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    u, y = torch.cat(xs).reshape(-1, 6).double(), torch.cat(ys).reshape(-1, 4).double()
    close = {"rtol": 1e-5, "atol": 1e-4}  # fp32 GEMMs per batch; one token more or less moves them by ~1
    for tokens in (5, 256, 450):  # inside the first batch, the second's first row, its second row
        moments = output_moments(Attention(), (((x,), {}, t) for x, t in zip(xs, ys)), tokens=tokens)
        assert moments.tokens == tokens
        torch.testing.assert_close(moments.gram, u[:tokens].T @ u[:tokens], **close)
        torch.testing.assert_close(moments.cross, y[:tokens].T @ u[:tokens], **close)
    assert output_moments(Attention(), (((x,), {}, t) for x, t in zip(xs, ys))).tokens == 600


def test_refit_tokens_change_the_weights_and_are_reported(tmp_path, source):
    """Item 6 end to end: 1024 calibration tokens are one CPU micro-batch, so every --refit-tokens gave the
    weights of all of them."""
    from safetensors.torch import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(3000))
    weights, reported = {}, {}
    for tokens in (5, 256, 0):
        out = tmp_path / f"out{tokens}"
        result = cli("convert", source, "-o", out, "--calib", calib, "--calib-tokens", 1024, "--refit-tokens", tokens,
                     "--quiet", *TINY)
        assert result.exit_code == 0, result.output
        weights[tokens] = load_file(next(out.glob("*.safetensors")))
        layers = json.loads((out / "conversion.json").read_text())["layers"]
        reported[tokens] = {layer["refit_tokens"] for layer in layers}
    name = next(n for n in weights[0] if n.endswith("o_proj.weight"))
    assert not torch.equal(weights[5][name], weights[256][name])
    assert not torch.equal(weights[256][name], weights[0][name])
    assert reported == {5: {5}, 256: {256}, 0: {1024}}


def test_gguf_cut_inside_its_header_is_refused(tmp_path):
    """Item 10: a GGUF truncated inside its header gave struct.error in convert."""
    import struct

    gguf = tmp_path / "cut.gguf"  # magic, version 3, 1 tensor, 4 metadata entries, a 20-byte key cut at 7
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 4) + struct.pack("<Q", 20) + b"general")
    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    assert_one_line(cli("convert", gguf, "-o", tmp_path / "out", *TINY), "cut.gguf is not a complete GGUF file")
    assert_one_line(cli("eval", gguf, "--text", text), "is not a complete GGUF file")
    assert not (tmp_path / "out").exists()


def test_eval_refuses_an_encoder(tmp_path):
    """Item 10: eval on a BERT folder failed deep in a forward pass (or gave numbers)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    text = tmp_path / "t.txt"
    text.write_text(random_text(400))
    assert_one_line(cli("eval", tmp_path / "bert", "--text", text),
                    "model_type 'bert' saved as BertForMaskedLM) is not a causal language model")


def test_a_foreign_option_message_agrees_in_number(tmp_path, source):
    """Messages: '--kv-rank do not apply'."""
    result = cli("convert", source, "-o", tmp_path / "out", "--to", "gta", "--kv-rank", "8")
    assert_one_line(result, "--kv-rank does not apply to --to gta")
    result = cli("convert", source, "-o", tmp_path / "out", "--to", "gta", "--kv-rank", "8", "--latent-heads", "2")
    assert_one_line(result, "--latent-heads, --kv-rank do not apply to --to gta")


def test_recipe_inputs_beside_the_recipe_file_are_found(tmp_path, monkeypatch):
    """Messages: relative paths in a recipe resolved from the working directory only. Inputs that exist only
    beside the recipe are read from there; what exists from the working directory, overrides and outputs stay."""
    from gtakit.finetune import load_recipe

    folder, cwd = tmp_path / "recipes", tmp_path / "work"
    (folder / "model").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "data" / "a.txt").write_text("x")
    (folder / "eval.txt").write_text("x")
    cwd.mkdir()
    (cwd / "eval.txt").write_text("x")
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "model"}, "teacher": {"model": "source"},
                                      "data": {"train": ["data/*.txt", "hf:some/set"], "eval": ["eval.txt"]},
                                      "output": {"dir": "out"}}))
    monkeypatch.chdir(cwd)
    loaded = load_recipe(recipe)
    assert loaded.model.path == str(folder / "model")
    assert loaded.data.train == [str(folder / "data" / "*.txt"), "hf:some/set"]
    assert loaded.data.eval == ["eval.txt"] and loaded.output.dir == "out" and loaded.teacher.model == "source"
    assert load_recipe(recipe, ["model.path=model"]).model.path == "model"


def test_written_files_follow_the_umask(tmp_path, source):
    """Messages: model.safetensors was written 0600 (safetensors' default) against the README's umask promise."""
    old_umask = os.umask(0o027)
    try:
        convert(str(source), tmp_path / "out", ConvertOptions(target="mla", kv_rank="12", rope_dim="8"),
                progress=False)
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert "model.safetensors" in modes or any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}


def test_an_unanswering_hub_fails_fast(tmp_path, monkeypatch):
    """Messages: an offline Hub name waited (30 s or more: huggingface_hub's requests have no timeout) before its
    one-line error. A Hub that does not answer now means the cache alone, as with HF_HUB_OFFLINE=1."""
    import socket
    import threading

    import huggingface_hub.constants as hub

    import gtakit.io.source as source_module

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(source_module, "HUB_ANSWER_SECONDS", 1.0, raising=False)  # absent before the fix
    results = []
    worker = threading.Thread(target=lambda: results.append(cli("convert", "someone/not-cached", "-o",
                                                                tmp_path / "out", *TINY)), daemon=True)
    started = time.time()
    try:
        worker.start()
        worker.join(60)
    finally:
        silent.close()
    assert results, "still waiting for the Hub after 60 s"
    assert time.time() - started < 30
    assert_one_line(results[0], "'someone/not-cached' is not a local path and is not in the Hugging Face cache")
