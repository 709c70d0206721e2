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
