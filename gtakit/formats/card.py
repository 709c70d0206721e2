"""Model card (README.md) of a converted folder, built with huggingface_hub.ModelCard."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard, ModelCardData


def build_card(report: dict) -> ModelCard:
    """The card of a converted (and maybe uptrained) folder from its conversion.json report."""
    if "source" not in report:  # uptrained from a folder without a conversion report
        sections = "\n\n".join(f"## {title}\n\n{body}" for title, body in report.get("card_sections", []))
        return ModelCard(f"---\nlibrary_name: transformers\ntags: [gtakit]\n---\n\n# {report['name']}\n\n{sections}\n")
    source = report["source"]
    kv = report["kv_cache"]
    target = report["target"]
    data = ModelCardData(
        base_model=source["name"] if source["kind"] == "hub" else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gtakit", target, "kv-cache-compression"],
    )
    settings = "\n".join(
        f"| `{key}` | `{'default' if value is None else value}` |" for key, value in report["settings"].items()
    )
    arch = "\n".join(f"| `{key}` | `{value}` |" for key, value in report["architecture"].items())
    lines = [
        f"# {source['name']} converted to {report['target_title']}",
        "",
        f"Converted with [gtakit](https://pypi.org/project/gtakit/) {report['gtakit_version']} from "
        f"`{source['name']}` ({source['model_type']}, {source['kind']}). The attention now caches only "
        f"{kv['elements_per_token_after']} elements per token ({kv['bytes_per_token_after']} bytes in "
        f"{kv['dtype']}) instead of {kv['elements_per_token_before']} "
        f"({kv['bytes_per_token_before']} bytes): {kv['ratio']:.1%} of the source's KV cache.",
        "",
        "Then uptrained with `gtakit finetune` to recover the quality the compression cost (see Uptraining below)."
        if report.get("uptraining")
        else "This is a zero-shot conversion (no training): the compression costs some quality, which uptraining on "
        "text like the model's own recovers.",
        "",
        "## KV cache per token (all layers)",
        "",
        "| | elements | bytes |",
        "|---|---|---|",
        f"| source | {kv['elements_per_token_before']} | {kv['bytes_per_token_before']} |",
        f"| converted | {kv['elements_per_token_after']} | {kv['bytes_per_token_after']} |",
        "",
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        lines += [
            "## Perplexity",
            "",
            f"Measured on `{evaluation['text']}` ({evaluation['tokens']} tokens, windows of {evaluation['window']}).",
            "",
            "| model | perplexity |",
            "|---|---|",
        ]
        if evaluation.get("source_perplexity") is not None:
            lines.append(f"| source | {evaluation['source_perplexity']:.3f} |")
        lines += [f"| converted | {evaluation['perplexity']:.3f} |", ""]
        if "positions" in evaluation:
            lines += long_context_section(evaluation)
    if report.get("format") == "deepseek-v3":
        lines += deepseek_v3_section(report["export"])
    lines += [
        "## Conversion settings",
        "",
        "| setting | value |",
        "|---|---|",
        settings,
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        arch,
        "",
        *usage_lines(report),
    ]
    extra = report.get("card_sections") or []
    for title, body in extra:
        lines += [f"## {title}", "", body, ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def long_context_section(evaluation: dict) -> list[str]:
    """Loss by position and passkey retrieval, source beside converted (recorded with --eval-window >= 2048)."""
    positions = "\n".join(
        f"| {b['start']}-{b['end']} | {b['source_perplexity']:.3f} | {b['perplexity']:.3f} | {b['ratio']:.3f} |"
        for b in evaluation["positions"]["buckets"])
    source, converted = evaluation["passkey"]["source"], evaluation["passkey"]["converted"]
    # Keys are ints in memory and strings once read back from conversion.json: pair the rows by order.
    passkey = "\n".join(f"| {length} | {_rate(mine)} | {_rate(theirs)} |" for (length, mine), theirs
                         in zip(source["by_length"].items(), converted["by_length"].values()))
    return [
        "## Long context",
        "",
        f"Perplexity of the tokens at each range of positions within the {evaluation['window']}-token windows "
        "above; ratio = converted / source. Distance growth (the last range's ratio over the first's): "
        f"{evaluation['positions']['distance_growth']:.3f}.",
        "",
        "| positions | source | converted | ratio |",
        "|---|---|---|---|",
        positions,
        "",
        f"Passkey retrieval with the evaluation text as haystack: {source['trials']} keys at each of "
        f"{len(source['cases']) // len(source['by_length'])} depths per length; accuracy [95% Wilson interval].",
        "",
        "| length (tokens) | source | converted |",
        "|---|---|---|",
        passkey,
        "",
    ]


def _rate(summary: dict) -> str:
    low, high = summary["interval"]
    return f"{summary['accuracy']:.0%} [{low * 100:.0f}-{high * 100:.0f}]"


def usage_lines(report: dict) -> list[str]:
    native = report.get("format") == "deepseek-v3"
    remote = "" if native else ", trust_remote_code=True"
    lines = [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{remote})',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
    ]
    if native:
        lines.append("A native DeepSeek-V3 checkpoint (`model_type: deepseek_v3`): no remote code, no gtakit.")
    else:
        lines.append("With gtakit installed, `import gtakit` registers the architecture and `trust_remote_code` is "
                     "not needed.")
    return lines + ["Per-layer errors and timings are in `conversion.json`.", ""]


def deepseek_v3_section(export: dict) -> list[str]:
    """What the DeepSeek-V3 export changed, where it runs, and how far it is from gtakit's MLA."""
    rows = "\n".join(f"| {layer['layer']} | {layer['latent_rms_cv']:.3f} | {layer['attention_rel_error']:.2e} |"
                     for layer in export["layers"])
    return [
        "## DeepSeek-V3 format",
        "",
        f"Latent norm: `{export['latent_norm']}`; latent {export['kv_lora_rank']} + RoPE {export['qk_rope_head_dim']}"
        f" elements per token and layer; RoPE table theta' = {export['rope_theta']:.6g} (every "
        f"{export['rope_grid_stride']}-th source frequency); query scale {export['query_scale_folded']:.4f} folded "
        "into the query rows.",
        "",
        f"Runs in: {export['engines']}.",
        "",
        f"Against gtakit's MLA on {export['check_tokens']} held-out tokens: KL {export['kl_per_token']:.2e} "
        f"nats/token, top-1 agreement {export['top1_agreement']:.1%}, max logit difference "
        f"{export['logits_max_abs_diff']:.2e} (max logit {export['logits_max_abs']:.1f}).",
        "",
        "| layer | latent RMS spread (CV) | attention output relative error |",
        "|---|---|---|",
        rows,
        "",
    ]


def dump_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
