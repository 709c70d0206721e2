"""`gtakit convert` on tiny real-format checkpoints: exactness, budgets, outputs, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from sources import SOURCES, VOCAB, check_generates_with_cache, random_text, write_source
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gtakit.cli.main import app

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    models = {}
    for name in SOURCES:
        models[name] = write_source(name, root / name)
    return root, models


def _ids(batch=2, length=24):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("target", ["mla", "gla"])
def test_full_budget_conversion_reproduces_source(source_dirs, tmp_path, name, target):
    root, models = source_dirs
    assert len(list((root / name).glob("*.safetensors"))) > 1  # really sharded
    out = tmp_path / "out"
    result = run_cli("convert", root / name, "--to", target, "-o", out, "--kv-rank", "full", "--rope-dim", "full",
                     "--quiet")
    assert result.exit_code == 0, result.output
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = _ids()
    with torch.no_grad():
        expected = models[name](ids).logits
        got = converted(ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    # Cached decode of the converted model agrees as well.
    with torch.no_grad():
        generated = converted.generate(ids[:1, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        reference = models[name].generate(ids[:1, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(generated, reference)


@pytest.mark.parametrize(
    "args, per_layer",
    [
        (["--to", "gla", "--latent-heads", "2", "--kv-rank", "12", "--rope-dim", "8"], 2 * 12 + 8),
        (["--to", "mla", "--kv-rank", "20", "--rope-dim", "6"], 20 + 6),
        (["--to", "gta"], 2 * 16 + 8),
        (["--to", "gta", "--groups", "1", "--rope-dim", "4"], 16 + 4),
        # default RoPE width: about a third of the cache, here capped at the head dim 16
        (["--to", "gla", "--latent-heads", "4", "--kv-rank", "8"], 4 * 8 + 16),
    ],
)
def test_reduced_budget_loads_generates_and_has_requested_cache(source_dirs, tmp_path, args, per_layer):
    root, _ = source_dirs
    out = tmp_path / "out"
    result = run_cli("convert", root / "llama-gqa-llama3rope", *args, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = check_generates_with_cache(out, per_layer)
    assert report["kv_cache"]["elements_per_token_before"] == 2 * 2 * 16 * 2


def test_output_folder_contents(source_dirs, tmp_path):
    root, _ = source_dirs
    out = tmp_path / "out"
    text = tmp_path / "eval.txt"
    text.write_text(random_text(1200))
    result = run_cli("convert", root / "mistral-gqa", "--to", "gla", "-o", out, "--max-shard-size", "50KB",
                     "--eval-text", text, "--eval-window", "128", "--quiet")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "README.md", "conversion.json",
            "tokenizer.json", "tokenizer_config.json", "configuration_gtakit.py", "modeling_gtakit.py", "form_gla.py"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    report = json.loads((out / "conversion.json").read_text())
    assert report["source"]["model_type"] == "mistral" and report["target"] == "gla"
    assert len(report["layers"]) == 2
    assert {"key_rel_error", "value_rel_error"} <= set(report["layers"][0])
    assert report["wall_time_s"] > 0 and report["peak_rss_mb"] > 0
    assert report["evaluation"]["perplexity"] > 1 and report["evaluation"]["source_perplexity"] > 1
    card = (out / "README.md").read_text()
    assert "gtakit" in card and "bytes" in card and "kv_rank" in card and "Perplexity" in card
    assert str(report["kv_cache"]["bytes_per_token_after"]) in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp folder renamed away


def test_bin_checkpoint_is_read_with_weights_only(source_dirs, tmp_path):
    root, models = source_dirs
    src = tmp_path / "bin"
    src.mkdir()  # transformers 5 only writes safetensors: write the legacy .bin checkpoint by hand
    models["llama-mha"].config.save_pretrained(src)
    torch.save(models["llama-mha"].state_dict(), src / "pytorch_model.bin")
    out = tmp_path / "out"
    result = run_cli("convert", src, "--to", "mla", "--kv-rank", "full", "--rope-dim", "full", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (converted(_ids()).logits - models["llama-mha"](_ids()).logits).abs().max() < 1e-4


def test_source_tokenizer_is_parsed_once_and_copied(source_dirs):
    from gtakit.io.source import open_source

    root, _ = source_dirs
    source = open_source(root / "llama-mha")
    first = source.load_tokenizer()
    first.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # a caller mutating its copy
    second = source.load_tokenizer()
    assert second is not first and "<extra>" not in second.get_vocab()
    assert second("a b c").input_ids == source.load_tokenizer()("a b c").input_ids


def _assert_clean_failure(result, tmp_path, *fragments):
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]
    assert "Traceback" not in result.output
    assert not [p for p in tmp_path.rglob(".out.tmp-*")]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()) or fragments == ("not empty",)


def test_missing_source(tmp_path):
    result = run_cli("convert", tmp_path / "nope", "-o", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, "does not exist")


def test_unsupported_architecture(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=48,
                             word_embed_proj_dim=32, vocab_size=50)).save_pretrained(tmp_path / "opt")
    result = run_cli("convert", tmp_path / "opt", "-o", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, "opt", "unsupported", "llama")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--to", "gla", "--kv-rank", "0"], ("--kv-rank 0", "between 1 and")),
        (["--to", "mla", "--kv-rank", "100000"], ("--kv-rank 100000", "between 1 and")),
        (["--to", "gla", "--rope-dim", "7"], ("--rope-dim 7", "even")),
        (["--to", "gta", "--rope-dim", "5"], ("--rope-dim 5", "even")),
        (["--to", "gla", "--latent-heads", "3"], ("--latent-heads 3", "valid counts: [1, 2, 4]")),
        (["--to", "gta", "--groups", "3"], ("--groups 3", "valid")),
        (["--to", "xyz"], ("--to",)),
        (["--init", "magic"], ("unknown --init",)),
    ],
)
def test_bad_options(source_dirs, tmp_path, args, fragments):
    root, _ = source_dirs
    result = run_cli("convert", root / "llama-gqa-llama3rope", *args, "-o", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, *fragments)


def test_non_empty_output_needs_force(source_dirs, tmp_path):
    root, _ = source_dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("convert", root / "llama-mha", "-o", out, "--quiet")
    _assert_clean_failure(result, tmp_path, "not empty")
    assert (out / "keep.txt").read_text() == "precious"
    result = run_cli("convert", root / "llama-mha", "-o", out, "--quiet", "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_truncated_shard(source_dirs, tmp_path):
    import shutil

    root, _ = source_dirs
    broken = tmp_path / "broken"
    shutil.copytree(root / "llama-mha", broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_cli("convert", broken, "-o", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, "truncated")


def test_eval_command_on_source_and_converted(source_dirs, tmp_path):
    root, _ = source_dirs
    text = tmp_path / "text.txt"
    text.write_text(random_text(700))
    out = tmp_path / "out"
    assert run_cli("convert", root / "llama-gqa-llama3rope", "--to", "gta", "-o", out, "--quiet").exit_code == 0
    results = {}
    for model in (root / "llama-gqa-llama3rope", out):
        result = run_cli("eval", model, "--text", text, "--window", "128", "--json")
        assert result.exit_code == 0, result.output
        results[model.name] = json.loads(result.stdout)
    assert results["llama-gqa-llama3rope"]["bytes_per_token"] == 2 * (2 * 2 * 16) * 4
    assert results["out"]["bytes_per_token"] == 2 * (2 * 16 + 8) * 4
    assert all(r["perplexity"] > 1 and r["tokens"] == 640 for r in results.values())


def test_push_sends_folder_and_card(source_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    root, _ = source_dirs
    out = tmp_path / "out"
    assert run_cli("convert", root / "llama-mha", "-o", out, "--quiet").exit_code == 0
    calls = []

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kw):
        calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, **kw):
        from pathlib import Path

        calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = run_cli("push", out, "me/tiny-gla", "--private")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create_repo", "me/tiny-gla", "model", True, True)
    assert calls[1][0] == "upload_folder" and "README.md" in calls[1][2] and "config.json" in calls[1][2]
    assert "https://hub/me/tiny-gla/commit/1" in result.output


def test_push_refuses_non_model_folder(tmp_path):
    result = run_cli("push", tmp_path, "me/x")
    assert result.exit_code == 2 and "no config.json" in result.output


def test_hub_id_offline_gives_clear_error(tmp_path):
    result = run_cli("convert", "someone/not-cached-model", "-o", tmp_path / "out")
    _assert_clean_failure(result, tmp_path, "someone/not-cached-model")


@pytest.mark.parametrize(
    "budget, head_dim, expected",
    [(192, 64, 64), (96, 64, 32), (48, 64, 24), (1024, 128, 64), (4096, 128, 64), (48, 16, 16), (30, 64, 14)],
)
def test_default_rope_width_is_about_a_third_of_the_cache(budget, head_dim, expected):
    from gtakit.forms.gla import default_rope_dim

    width = default_rope_dim(budget, head_dim)
    assert width == expected
    assert width % 2 == 0 and width <= min(64, head_dim) and width <= budget // 2


def test_options_are_resolved_once_into_a_frozen_copy():
    from dataclasses import FrozenInstanceError, replace

    from gtakit.convert import ConvertOptions
    from gtakit.convert.pipeline import resolve_options
    from gtakit.errors import GtakitError

    options = ConvertOptions(target="mla", calib="calib.txt")
    resolved = resolve_options(options)
    assert (options.init, options.refit) == ("auto", "auto")  # the caller's object is untouched
    assert (resolved.init, resolved.refit) == ("aware", "output")
    with pytest.raises(FrozenInstanceError):
        resolved.kv_rank = 8
    assert replace(resolved, kv_rank=8).kv_rank == 8
    weights_only = resolve_options(ConvertOptions(target="mla"))
    assert (weights_only.init, weights_only.refit) == ("svd", "none")
    with pytest.raises(GtakitError, match="needs calibration text"):
        resolve_options(ConvertOptions(target="mla", init="aware"))
