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
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "With gtakit installed, `import gtakit` registers the architecture and `trust_remote_code` is not needed.",
        "Per-layer reconstruction errors and timings are in `conversion.json`.",
        "",
    ]
    extra = report.get("card_sections") or []
    for title, body in extra:
        lines += [f"## {title}", "", body, ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def dump_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
