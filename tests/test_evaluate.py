"""`gtakit eval` beyond perplexity on tiny models: agreement with the source, passkey retrieval (filler and natural
haystacks, Wilson intervals), loss by position, and lm-evaluation-harness tasks (loglikelihood and generate_until)
run through the compressed cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from sources import COMMON, random_text, tiny_tokenizer, write_source
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from gtakit.cli.main import app
from gtakit.convert import ConvertOptions, convert
from gtakit.errors import GtakitError
from gtakit.evaluate import agreement, load_model, perplexity
from gtakit.evaluate.passkey import (DEFAULT_TRIALS, INTRO, NEEDLE, answer_tokens, build_natural_prompt, build_prompt,
                                    passkey)
from gtakit.evaluate.positions import bucket_bounds, position_losses
from gtakit.evaluate.stats import wilson_interval
from gtakit.models import output_cache

pytestmark = pytest.mark.slow  # end-to-end evaluations (lm-eval, passkey, position buckets) of converted folders


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


@pytest.fixture(scope="module")
def smol_tokenizer():
    """A real BPE tokenizer (the bundled SmolLM2's), so that digits and prose are tokens, not unknowns."""
    from gtakit.io.source import bundled_smollm2

    gguf = bundled_smollm2()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def prose(sentences: int, seed: int = 0) -> str:
    """Seeded pseudo-prose: sentences with ends and paragraph breaks, as a natural haystack has."""
    words = "the river a mill hills children school road baker shop dawn rain roofs gardens old walks".split()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(sentences):
        picks = torch.randint(0, len(words), (int(torch.randint(5, 14, (1,), generator=generator)),),
                              generator=generator)
        out.append(" ".join(words[int(j)] for j in picks).capitalize() + (".\n" if i % 7 == 6 else ". "))
    return "".join(out)


def test_wilson_interval_matches_known_values():
    assert [round(x, 3) for x in wilson_interval(0, 20)] == [0.0, 0.161]
    assert [round(x, 3) for x in wilson_interval(20, 20)] == [0.839, 1.0]
    assert [round(x, 3) for x in wilson_interval(10, 20)] == [0.299, 0.701]
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0  # exact, not 0.9999999
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_passkey_scores_a_perfect_retriever_as_perfect(smol_tokenizer):
    tokenizer = smol_tokenizer
    result = passkey(Oracle(tokenizer), tokenizer, lengths=(256, 512), depths=(0.0, 1.0), trials=2)
    assert [c["accuracy"] for c in result["cases"]] == [1.0] * 4
    assert set(result["by_length"]) == {256, 512}
    for summary in result["by_length"].values():
        assert summary["accuracy"] == 1.0 and summary["hits"] == summary["trials"] == 4
        assert summary["interval"][1] == 1.0 and summary["interval"][0] == pytest.approx(wilson_interval(4, 4)[0])
    natural = passkey(Oracle(tokenizer), tokenizer, lengths=(256,), haystack=prose(60))
    assert natural["haystack"] == "text" and natural["by_length"][256]["hits"] == 5 * DEFAULT_TRIALS == 20
    assert natural["by_length"][256]["interval"] == [pytest.approx(0.839, abs=1e-3), 1.0]
    json.dumps(natural)  # the record goes into --output files and conversion.json


def test_passkey_cannot_be_passed_without_attention(smol_tokenizer):
    """o_proj = 0: no token sees another, so the key cannot reach the question; no false positives either (the
    key is in the prompt, never in what is scored)."""
    torch.manual_seed(0)
    config = LlamaConfig(**dict(COMMON, vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=48,
                                max_position_embeddings=512), num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    result = passkey(model, smol_tokenizer, lengths=(128,), depths=(0.0, 0.5, 1.0), trials=2)
    assert result["by_length"][128]["hits"] == 0 and result["by_length"][128]["interval"][0] == 0.0


def test_natural_haystack_holds_the_needle_at_its_depth(smol_tokenizer):
    tokenizer = smol_tokenizer
    haystack = tokenizer(prose(400), add_special_tokens=False).input_ids
    needle = tokenizer(NEEDLE.format(key="31415"), add_special_tokens=False).input_ids
    intro = len(tokenizer(INTRO, add_special_tokens=False).input_ids)
    spans = set()
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        for start in (0.0, 0.6):
            prompt = build_natural_prompt(tokenizer, 1024, depth, "31415", haystack, start)
            ids = prompt.ids[0].tolist()
            assert len(ids) + answer_tokens(tokenizer, "31415") == 1024  # the answer fits in the length too
            at = next(i for i in range(len(ids)) if ids[i: i + len(needle)] == needle)
            assert abs(at / 1024 - depth) <= 0.05, (depth, at)
            before = tokenizer.decode(ids[intro: at])
            assert at == intro or before.rstrip(" ").endswith((".", "\n")), before[-40:]  # at a sentence end
            if depth == 0.5:
                spans.add(tuple(ids[intro: intro + 20]))
    assert len(spans) == 2  # the start moves the span through the text
    with pytest.raises(GtakitError, match="fewer than the longest passkey length 4096"):
        passkey(Oracle(tokenizer), tokenizer, lengths=(4096,), haystack=prose(40))


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


# ------------------------------------------------------------------------------------------- loss by position


def test_bucket_losses_add_up_to_the_whole_window_loss(models):
    source, tokenizer = load_model(str(models / "source"))
    text = (models / "text.txt").read_text()
    whole = perplexity(source, tokenizer, text, window=200)
    for buckets in (None, (0, 7, 50, 200)):
        result = position_losses(source, tokenizer, text, 200, buckets=buckets)
        rows = result["buckets"]
        assert sum(b["tokens"] for b in rows) == whole["windows"] * 199
        mean = sum(b["tokens"] * b["nll"] for b in rows) / sum(b["tokens"] for b in rows)
        assert mean == pytest.approx(whole["nll"], abs=1e-5)
        assert result["nll"] == pytest.approx(whole["nll"], abs=1e-5)
    assert [(b["start"], b["end"], b["tokens"]) for b in rows] == [(0, 7, 6 * 4), (7, 50, 43 * 4), (50, 200, 150 * 4)]
    assert bucket_bounds(3000) == (0, 512, 2048, 3000) and bucket_bounds(20000)[-2:] == (8192, 20000)
    small = load_model(str(models / "small"))[0]
    against = position_losses(small, tokenizer, text, 200, buckets=(0, 50, 200), against=source)
    assert against["source_perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    for row in against["buckets"]:
        assert row["ratio"] == pytest.approx(row["perplexity"] / row["source_perplexity"])
    assert against["distance_growth"] == pytest.approx(against["buckets"][-1]["ratio"] / against["buckets"][0]["ratio"])
    same = agreement(small, source, tokenizer, text, window=200)
    assert against["kl"] == pytest.approx(same["kl"], rel=1e-4) and against["top1_agreement"] == same["top1_agreement"]


def test_positions_command_and_its_one_line_errors(models):
    text = models / "text.txt"
    result = cli("eval", models / "small", "--text", text, "--window", "128", "--positions", "--buckets", "0,32,128",
                 "--against", "source", "--passkey", "--lengths", "96", "--depths", "0.5", "--trials", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(b["start"], b["end"]) for b in report["positions"]["buckets"]] == [(0, 32), (32, 128)]
    assert report["positions"]["distance_growth"] > 0 and report["kl"] > 0 and report["windows"] == 7
    assert report["passkey"]["haystack"] == "text"
    table = cli("eval", models / "small", "--text", text, "--window", "128", "--positions", "--passkey",
                "--lengths", "96", "--depths", "0", "--trials", "1")
    assert table.exit_code == 0, table.output
    assert "| 0-128 |" in table.stdout and "% [" in table.stdout
    for args, message in [
        (("--positions",), "--positions measures loss by position within windows of a text: give --text FILE"),
        (("--text", text, "--window", "512", "--positions"), "--window 512 exceeds the model's 256 positions"),
        (("--text", text, "--window", "128", "--positions", "--buckets", "0,64,512"), "--buckets ends at 512"),
        (("--text", text, "--buckets", "0,64"), "--buckets sets the --positions buckets"),
    ]:
        refused = cli("eval", models / "small", *args)
        lines = refused.output.strip().splitlines()  # the model's loading bar may come first; then one error line
        assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:] and message in lines[-1], lines


# ------------------------------------------------------------------------------------------- conversion records


def test_conversion_with_a_long_eval_window_records_positions_and_passkey(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(**dict(COMMON, max_position_embeddings=2048), num_key_value_heads=2, head_dim=16)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "source")
    tiny_tokenizer().save_pretrained(tmp_path / "source")
    text = tmp_path / "text.txt"
    text.write_text(random_text(4200))
    result = cli("convert", tmp_path / "source", "-o", tmp_path / "out", "--to", "mla", "--kv-rank", "12",
                 "--rope-dim", "8", "--eval-text", text, "--eval-tokens", "4096", "--eval-window", "2048", "--quiet")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "out" / "conversion.json").read_text())["evaluation"]
    buckets = evaluation["positions"]["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 512), (512, 2048)]
    mean = sum(b["tokens"] * b["source_nll"] for b in buckets) / sum(b["tokens"] for b in buckets)
    assert mean == pytest.approx(float(torch.tensor(evaluation["source_perplexity"]).log()), abs=1e-5)
    for model in ("source", "converted"):
        record = evaluation["passkey"][model]
        assert record["haystack"] == "text" and list(record["by_length"]) == ["1024", "2048"]
        assert all(s["trials"] == 5 * DEFAULT_TRIALS for s in record["by_length"].values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Long context" in card and "| 512-2048 |" in card and "| 2048 |" in card
    refused = cli("convert", tmp_path / "source", "-o", tmp_path / "out2", "--eval-text", text, "--eval-window",
                  "4096")
    assert refused.exit_code == 2 and "--eval-window 4096 exceeds the model's 2048 positions" in refused.output


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
