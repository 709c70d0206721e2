"""`gtakit eval` beyond perplexity on tiny models: agreement with the source, passkey retrieval, and
lm-evaluation-harness tasks (loglikelihood and generate_until) run through the compressed cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from sources import random_text, write_source
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert
from gtakit.evaluate import agreement, load_model
from gtakit.evaluate.passkey import NEEDLE, build_prompt, passkey
from gtakit.models import output_cache

runner = CliRunner()
DATA = Path(__file__).parent / "data" / "lm_eval"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    write_source("llama-gqa-llama3rope", root / "source")
    convert(str(root / "source"), root / "lossless", ConvertOptions(target="gla", latent_heads=2, kv_rank="full",
                                                                    rope_dim="full"), progress=False)
    convert(str(root / "source"), root / "small", ConvertOptions(target="mla", kv_rank="12", rope_dim="8"),
            progress=False)
    (root / "text.txt").write_text(random_text(900))
    return root


# ------------------------------------------------------------------------------------------- agreement


def test_agreement_is_exact_for_a_lossless_conversion_and_not_for_a_small_one(models):
    source, tokenizer = load_model(str(models / "source"))
    text = (models / "text.txt").read_text()
    itself = agreement(source, source, tokenizer, text, window=128)
    assert itself["kl"] == pytest.approx(0.0, abs=1e-6) and itself["top1_agreement"] == 1.0
    assert itself["perplexity"] == pytest.approx(itself["source_perplexity"])
    lossless = agreement(load_model(str(models / "lossless"))[0], source, tokenizer, text, window=128)
    small = agreement(load_model(str(models / "small"))[0], source, tokenizer, text, window=128)
    assert lossless["kl"] < 1e-6 and lossless["top1_agreement"] > 0.99
    assert small["kl"] > 100 * max(lossless["kl"], 1e-9) and small["top1_agreement"] < 1.0
    assert small["tokens"] == lossless["tokens"] == 7 * 128


def test_against_source_reads_conversion_json(models):
    result = cli("eval", models / "small", "--text", models / "text.txt", "--window", "128", "--against", "source",
                 "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["against"] == str(models / "source")
    assert scores["kl"] > 0 and 0 <= scores["top1_agreement"] <= 1 and scores["source_perplexity"] > 1
    refused = cli("eval", models / "small", "--against", "source")
    assert refused.exit_code == 2 and "--against compares on a text" in refused.output


# ------------------------------------------------------------------------------------------- passkey


def test_passkey_prompt_has_the_key_at_its_depth_and_about_its_length(models):
    tokenizer = AutoTokenizer.from_pretrained(models / "source")
    for depth in (0.0, 0.5, 1.0):
        prompt = build_prompt(tokenizer, 400, depth, "w77")
        text = tokenizer.decode(prompt.ids[0])
        needle = tokenizer.decode(tokenizer(NEEDLE.format(key="w77"), add_special_tokens=False).input_ids)
        position = text.index(needle.strip()) / len(text)
        assert abs(position - depth) < 0.15, (depth, position)
        assert 300 <= prompt.ids.shape[1] <= 400


class Oracle(torch.nn.Module):
    """Answers with the number that follows 'pass key is' in its prompt: a model that retrieves perfectly."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"max_position_embeddings": 4096})()

    def generate(self, ids, max_new_tokens, **kwargs):
        import re

        key = re.search(r"pass key is (\d+)", self.tokenizer.decode(ids[0])).group(1)
        answer = self.tokenizer(" " + key, add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([ids, answer[:, :max_new_tokens]], dim=1)


def test_passkey_scores_a_perfect_retriever_as_perfect():
    from transformers import AutoTokenizer as Auto

    from gtakit.io.source import bundled_smollm2

    gguf = bundled_smollm2()
    tokenizer = Auto.from_pretrained(gguf.parent, gguf_file=gguf.name)
    result = passkey(Oracle(tokenizer), tokenizer, lengths=(256, 512), depths=(0.0, 1.0), trials=2)
    assert [c["accuracy"] for c in result["cases"]] == [1.0] * 4
    assert result["by_length"] == {256: 1.0, 512: 1.0}


def test_passkey_command_decodes_through_the_compressed_cache(models, monkeypatch):
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spying(*args, **kwargs):
        model = original(*args, **kwargs)
        model.register_forward_hook(lambda m, a, kw, out: seen.append(output_cache(out)), with_kwargs=True)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spying)
    result = cli("eval", models / "small", "--passkey", "--lengths", "96,128", "--depths", "0,1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["passkey"]
    assert [(c["length"], c["depth"]) for c in report["cases"]] == [(96, 0.0), (96, 1.0), (128, 0.0), (128, 1.0)]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in report["cases"])
    caches = [c for c in seen if c is not None and c.get_seq_length() > 64]
    assert caches, "generate() ran without a cache"
    assert all(c.layers[0].keys.shape[1] == 1 and c.layers[0].keys.shape[-1] == 12 for c in caches)  # MLA latents
    assert cli("eval", models / "small", "--passkey", "--lengths", "1000000").exit_code == 2


# ------------------------------------------------------------------------------------------- lm-eval


TASKS = {
    "gtakit_tiny_mc": """
output_type: multiple_choice
dataset_kwargs:
  data_files:
    test: {data}/multiple_choice.jsonl
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "gtakit_tiny_gen": """
output_type: generate_until
dataset_kwargs:
  data_files:
    test: {data}/generation.jsonl
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """lm-eval task files for the JSON lines shipped in tests/data/lm_eval (paths must be absolute)."""
    pytest.importorskip("lm_eval")
    folder = tmp_path_factory.mktemp("tasks")
    for name, body in TASKS.items():
        header = f"task: {name}\ndataset_path: json\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(header + body.format(data=DATA))
    return folder


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, token] for i, token in enumerate(cont)))


@pytest.fixture(autouse=True)
def offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_tasks_score_the_converted_model_as_it_decodes(models, task_dir, tmp_path):
    from gtakit.evaluate.harness import run_tasks

    model, tokenizer = load_model(str(models / "small"))
    results = run_tasks(model, tokenizer, ["gtakit_tiny_mc", "gtakit_tiny_gen"], include_path=str(task_dir),
                        log_samples=True)

    # loglikelihood: lm-eval's accuracy is the argmax of our own summed log-probabilities
    rows = [json.loads(line) for line in (DATA / "multiple_choice.jsonl").read_text().splitlines()]
    right = [max(range(len(r["choices"])), key=lambda i: _choice_logprob(model, tokenizer, r["question"],
                                                                           " " + r["choices"][i])) == r["answer"]
             for r in rows]
    assert results["results"]["gtakit_tiny_mc"]["acc,none"] == pytest.approx(sum(right) / len(rows))

    # generate_until: lm-eval's generations are what greedy generate() with the compressed cache gives
    samples = results["samples"]["gtakit_tiny_gen"]
    assert len(samples) == 3
    for sample in samples:
        ids = tokenizer(sample["doc"]["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert output_cache(out).layers[0].keys.shape[-1] == 12  # latents, not per-head keys
        expected = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        assert sample["resps"][0][0].strip() == expected.strip()


def test_tasks_command_prints_the_table_and_writes_json(models, task_dir, tmp_path):
    out = tmp_path / "results.json"
    result = cli("eval", models / "small", "--tasks", "gtakit_tiny_mc", "--include-path", task_dir, "--limit", "2",
                 "--output", out)
    assert result.exit_code == 0, result.output
    assert "gtakit_tiny_mc" in result.stdout and "acc" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["lm_eval"]["results"]["gtakit_tiny_mc"]["alias"] == "gtakit_tiny_mc"
    unknown = cli("eval", models / "small", "--tasks", "no_such_task", "--include-path", task_dir)
    assert unknown.exit_code == 2 and "unknown lm-eval task(s) no_such_task" in unknown.output
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
