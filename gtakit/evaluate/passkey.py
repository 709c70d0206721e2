"""Long-context retrieval (`gtakit eval --passkey`): a number hidden at a chosen depth of filler text, asked for at
the end, answered by greedy decoding through the model's own (compressed) cache.

A shared RoPE key keeps only some rotary components, so position information can fade at long range while
perplexity on short windows looks fine; this measures it directly. Everything is generated from a seed: no data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError

INTRO = "There is a pass key hidden in the long text below. Find it and remember it, you will be asked for it.\n"
FILLER = (
    "The river runs past the old mill and turns toward the hills. Children walk to school along the road. "
    "A baker opens the shop before dawn. Rain falls on the roofs and the gardens drink it. "
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class PasskeyPrompt:
    ids: torch.Tensor  # [1, length]
    key: str
    depth: float
    length: int


def build_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """About `length` tokens: intro, filler with the needle after `depth` of it (0 = start, 1 = end), question."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    fixed = count(INTRO + NEEDLE.format(key=key) + QUESTION)
    units = max(1, (length - fixed) // count(FILLER))
    before = round(depth * units)
    text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (units - before) + QUESTION
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return PasskeyPrompt(ids=ids, key=key, depth=depth, length=length)


def answer_of(text: str) -> str | None:
    """The first number in the generated text."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def passkey(
    model,
    tokenizer,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    trials: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Accuracy per (length, depth) over `trials` random 5-digit keys; rows in `cases`, summary in `by_length`."""
    if not lengths or min(lengths) < 64:
        raise GtakitError("--lengths must be token counts of at least 64")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise GtakitError("--depths must be fractions between 0 and 1")
    if trials < 1:
        raise GtakitError("--trials must be at least 1")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise GtakitError(f"--lengths {max(lengths)} exceeds the model's {limit} positions; use shorter lengths")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cases, jobs = [], [(n, d) for n in lengths for d in depths]
    for length, depth in tqdm(jobs, desc="passkey", disable=not progress):
        hits = 0
        for _ in range(trials):
            key = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
            prompt = build_prompt(tokenizer, length, depth, key)
            new = len(tokenizer(" " + key, add_special_tokens=False).input_ids) + 2
            ids = prompt.ids.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=pad)
            hits += answer_of(tokenizer.decode(out[0, prompt.ids.shape[1]:], skip_special_tokens=True)) == key
        cases.append({"length": length, "depth": depth, "tokens": int(prompt.ids.shape[1]), "trials": trials,
                      "accuracy": hits / trials})
    by_length = {n: sum(c["accuracy"] for c in cases if c["length"] == n) / len(depths) for n in lengths}
    return {"cases": cases, "by_length": by_length, "trials": trials, "seed": seed}
