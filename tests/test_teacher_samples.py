"""data.teacher_samples: text the teacher writes itself, drawn from its own distribution, packed as training rows."""

from __future__ import annotations

import pytest
import torch
from sources import SOURCES, VOCAB, tiny_tokenizer

from gtakit.errors import GtakitError
from gtakit.finetune import load_recipe
from gtakit.finetune.data import build_packed_data
from gtakit.finetune.recipe import DataSection
from gtakit.finetune.samples import teacher_samples

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return SOURCES["llama-gqa-llama3rope"]().eval()


def write(teacher, tokens=300, length=24, batch=4, seed=0):
    return teacher_samples(teacher, CPU, tiny_tokenizer(), tokens, length, batch, seed)


def test_samples_are_seeded_end_with_eos_and_leave_the_random_state_alone(teacher):
    state = torch.get_rng_state()
    pieces = write(teacher)
    assert torch.equal(torch.get_rng_state(), state)
    assert sum(len(p) for p in pieces) >= 300 and len(pieces) % 4 == 0
    eos = tiny_tokenizer().eos_token_id
    for piece in pieces:
        assert piece.dtype == torch.int32 and piece[-1] == eos and 2 <= len(piece) <= 25
        assert eos not in piece[:-1].tolist()
    assert all(torch.equal(a, b) for a, b in zip(pieces, write(teacher)))
    assert not all(torch.equal(a, b) for a, b in zip(pieces, write(teacher, seed=1)))


def test_samples_ignore_the_checkpoints_own_sampling_defaults(teacher):
    """A greedy or sharpened generation_config in the checkpoint must not bend the samples' distribution."""
    plain = write(teacher, tokens=100)
    saved = teacher.generation_config
    teacher.generation_config = type(saved)(do_sample=False, top_k=1, temperature=0.05, top_p=0.1,
                                            repetition_penalty=3.0)
    try:
        bent = write(teacher, tokens=100)
    finally:
        teacher.generation_config = saved
    assert all(torch.equal(a, b) for a, b in zip(plain, bent))
    # at temperature 1 the rows of one batch differ (a random tiny model is close to uniform over 97 tokens)
    assert len({tuple(p.tolist()) for p in plain}) == len(plain)


def test_samples_are_packed_after_the_text(tmp_path, teacher):
    (tmp_path / "a.txt").write_text(" ".join(f"w{i % 90 + 3}" for i in range(200)))
    data = DataSection(train=[str(tmp_path / "a.txt")], eval_sequences=1, teacher_samples=200, sample_length=16)
    written = []
    packed = build_packed_data(data, tiny_tokenizer(), 8, lambda: written.append(1) or write(teacher, 200, 16))
    assert written == [1]
    text_rows = 201 // 8  # 200 words + EOS
    assert len(packed.train) + len(packed.eval) >= text_rows + 200 // 8
    assert packed.train[0, :3].tolist() == [3, 4, 5]
    with pytest.raises(GtakitError, match="teacher"):
        build_packed_data(data, tiny_tokenizer(), 8)


def test_recipe_may_train_on_samples_alone_but_needs_a_teacher():
    base = {"model": {"path": "m"}, "output": {"dir": "o"}, "data": {"teacher_samples": 1000}}
    recipe = load_recipe({**base, "teacher": {"model": "source"}, "loss": {"kind": "distill"}})
    assert recipe.data.train == [] and recipe.data.teacher_samples == 1000
    with pytest.raises(GtakitError, match="data.teacher_samples are written by the teacher"):
        load_recipe(base)
    with pytest.raises(GtakitError, match="'data.train' is required"):
        load_recipe({**base, "data": {}})
    assert VOCAB > 3


def test_sample_command_writes_json_lines_once(tmp_path):
    import json

    from sources import write_source
    from typer.testing import CliRunner

    from gtakit.cli.main import app

    write_source("llama-gqa-llama3rope", tmp_path / "src")
    out = tmp_path / "samples.jsonl"
    args = ["sample", str(tmp_path / "src"), "-o", str(out), "--tokens", "40", "--length", "12", "--batch", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(rows) % 2 == 0 and sum(len(r.split()) for r in rows) >= 40
    vocabulary = tiny_tokenizer().get_vocab()
    assert all(word in vocabulary for r in rows for word in r.split())
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "pass --force" in again.output and "Traceback" not in again.output
    assert CliRunner().invoke(app, args + ["--force"]).exit_code == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == rows  # seeded
    assert not list(tmp_path.glob("*.partial"))
