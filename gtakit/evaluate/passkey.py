"""Long-context retrieval (`gtakit eval --passkey`): a number hidden at a chosen depth of a haystack, asked for at
the end, answered by greedy decoding through the model's own (compressed) cache.

A shared RoPE key keeps only some rotary components, so position information can fade at long range while
perplexity on short windows looks fine; this measures it directly. The haystack is a repeated filler sentence, or
natural prose (`--text`): repeated filler is easy to skip over, so a model can find the needle in it by pattern
rather than by reading, while prose is what the model will actually face. Keys are generated from a seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError

from .stats import wilson_interval

INTRO = "There is a pass key hidden in the long text below. Find it and remember it, you will be asked for it.\n"
FILLER = (
    "The river runs past the old mill and turns toward the hills. Children walk to school along the road. "
    "A baker opens the shop before dawn. Rain falls on the roofs and the gardens drink it. "
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# 4 keys at each of the 5 depths = 20 per length: enough that the 95% interval of a length's accuracy is about
# +-20 points rather than the +-40 of 5 trials, at a cost still within minutes for a 135M model at 8k tokens.
DEFAULT_TRIALS = 4
SENTENCE_END = re.compile(r"[.!?\n]\s*$")


@dataclass
class PasskeyPrompt:
    ids: torch.Tensor  # [1, length]
    key: str
    depth: float
    length: int


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def answer_tokens(tokenizer, key: str) -> int:
    """Tokens generated for the answer: the key's own and two spare (a space or a quote before it)."""
    return len(_ids(tokenizer, " " + key)) + 2


def build_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """About `length` tokens with the answer: intro, filler with the needle after `depth` of it (0 = start,
    1 = end), question; room is left for the answer so that a length equal to the model's positions fits."""
    fixed = len(_ids(tokenizer, INTRO + NEEDLE.format(key=key) + QUESTION)) + answer_tokens(tokenizer, key)
    units = max(1, (length - fixed) // len(_ids(tokenizer, FILLER)))
    before = round(depth * units)
    text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (units - before) + QUESTION
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return PasskeyPrompt(ids=ids, key=key, depth=depth, length=length)


def build_natural_prompt(tokenizer, length: int, depth: float, key: str, haystack: list[int],
                         start: float = 0.0) -> PasskeyPrompt:
    """`length` tokens with the answer: intro, a contiguous span of the `haystack` token ids with the needle after
    `depth` of it, question. `start` in [0, 1) picks where in the haystack the span begins, so that trials read
    different prose.

    Assembled from token ids rather than re-tokenised text, so that the length and the needle's depth are exact."""
    intro, needle, question = (_ids(tokenizer, part) for part in (INTRO, NEEDLE.format(key=key), QUESTION))
    fill = max(1, length - len(intro) - len(needle) - len(question) - answer_tokens(tokenizer, key))
    if len(haystack) < fill:
        raise GtakitError(f"the passkey text has {len(haystack)} tokens, fewer than the {fill} a {length}-token "
                          "prompt needs; give a longer --text or shorter --lengths")
    offset = int(start * (len(haystack) - fill + 1))
    span = haystack[offset: offset + fill]
    cut = _sentence_boundary_near(tokenizer, span, round(depth * fill), reach=min(32, fill // 50))
    ids = torch.tensor([intro + span[:cut] + needle + span[cut:] + question])
    return PasskeyPrompt(ids=ids, key=key, depth=depth, length=length)


def _sentence_boundary_near(tokenizer, ids: list[int], cut: int, reach: int) -> int:
    """The cut nearest `cut`, within `reach` tokens, that follows a sentence or line end, else `cut` itself: a
    needle dropped mid-sentence is a harder (and stranger) test than the one asked for. `reach` stays within 2% of
    the span so that the depth is still what was asked."""
    def ends_sentence(index: int) -> bool:  # the span's start follows the intro's newline; its end is arbitrary
        return index == 0 or bool(SENTENCE_END.search(tokenizer.decode(ids[index - 1: index])))

    candidates = range(max(0, cut - reach), min(len(ids), cut + reach) + 1)
    return min((i for i in candidates if ends_sentence(i)), key=lambda i: abs(i - cut), default=cut)


def answer_of(text: str) -> str | None:
    """The first number in the generated text."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def rate(hits: int, trials: int) -> dict:
    """Accuracy with its 95% Wilson interval (a list, so the record survives a JSON round trip unchanged)."""
    return {"accuracy": hits / trials, "hits": hits, "trials": trials, "interval": list(wilson_interval(hits, trials))}


def _check(model, lengths, depths, trials: int, haystack: list[int] | None) -> None:
    if not lengths or min(lengths) < 64:
        raise GtakitError("--lengths must be token counts of at least 64")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise GtakitError("--depths must be fractions between 0 and 1")
    if trials < 1:
        raise GtakitError("--trials must be at least 1")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise GtakitError(f"--lengths {max(lengths)} exceeds the model's {limit} positions; use shorter lengths")
    if haystack is not None and len(haystack) < max(lengths):
        raise GtakitError(f"the --text has {len(haystack)} tokens, fewer than the longest passkey length "
                          f"{max(lengths)}; give a longer text or shorter --lengths")


def _retrieves(model, tokenizer, prompt: PasskeyPrompt, pad: int) -> bool:
    """Greedy-decode a few tokens after the question: does the first number produced equal the key?"""
    ids = prompt.ids.to(next(model.parameters()).device)
    new = answer_tokens(tokenizer, prompt.key)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=pad)
    return answer_of(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)) == prompt.key


@torch.no_grad()
def passkey(
    model,
    tokenizer,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    progress: bool = False,
    haystack: str | None = None,
) -> dict:
    """Accuracy per (length, depth) over `trials` random 5-digit keys; rows in `cases`, per length in `by_length`
    (accuracy, hits, trials and the 95% Wilson `interval`). `haystack`: prose to hide the keys in instead of the
    filler sentence (a contiguous span of it per trial, starting at a seeded random place)."""
    hay = _ids(tokenizer, haystack) if haystack is not None else None
    _check(model, lengths, depths, trials, hay)
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cases, jobs = [], [(n, d) for n in lengths for d in depths]
    for length, depth in tqdm(jobs, desc="passkey", disable=not progress):
        hits = 0
        for _ in range(trials):
            key = str(int(torch.randint(10_000, 100_000, (1,), generator=generator)))
            if hay is None:
                prompt = build_prompt(tokenizer, length, depth, key)
            else:
                start = float(torch.rand((), generator=generator))
                prompt = build_natural_prompt(tokenizer, length, depth, key, hay, start)
            hits += _retrieves(model, tokenizer, prompt, pad)
        cases.append({"length": length, "depth": depth, "tokens": int(prompt.ids.shape[1]), **rate(hits, trials)})
    by_length = {n: rate(sum(c["hits"] for c in cases if c["length"] == n), trials * len(depths)) for n in lengths}
    return {"cases": cases, "by_length": by_length, "trials": trials, "seed": seed,
            "haystack": "filler" if haystack is None else "text"}
