"""Write the uptrained model as a converted HF folder (same layout and loading guarantees as `gtakit convert`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

import gtakit
from gtakit.formats import write_model
from gtakit.io import DTYPES
from gtakit.io.output import OutputFolder

from .recipe import Recipe


def output_folder(recipe: Recipe, log: Callable[[str], None] | None = None) -> OutputFolder:
    """Where the uptrained model goes; it may not hold the input model, the checkpoints or the data."""
    inputs = [(recipe.model.path, "the input model (model.path)"), (recipe.checkpoint_dir, "checkpoint.dir")]
    inputs += [(spec, "a data file") for spec in [*recipe.data.train, *recipe.data.eval]]
    protect = [(Path(p).expanduser(), what) for p, what in inputs if Path(p).expanduser().exists()]
    return OutputFolder(recipe.output.dir, recipe.output.force, protect=protect,
                        force_hint="set output.force=true to overwrite it", log=log)


def merged_model(recipe: Recipe, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (un-wrapped) CPU model holding the trained weights; LoRA adapters are merged into them.

    The model is rebuilt from the recipe's input folder so this works the same for a single process, DDP and
    FSDP (whose full state dict exists only as gathered tensors on the main process)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32)
    if recipe.train.mode != "lora":
        missing, unexpected = base.load_state_dict(state_dict, strict=False)
        _check_keys(base, missing, unexpected)
        return base
    from peft import get_peft_model

    from .modes import lora_config

    peft_model = get_peft_model(base, lora_config(base, recipe.lora))
    missing, unexpected = peft_model.load_state_dict(state_dict, strict=False)
    _check_keys(peft_model, missing, unexpected)
    return peft_model


def _check_keys(model, missing, unexpected) -> None:
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"trained state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def export_model(accelerator, model, recipe: Recipe, tokenizer, state, after: float, data, started: float,
                 say: Callable[[str], None], scorer=None) -> dict:
    state_dict = accelerator.get_state_dict(model)  # every process must take part (FSDP gathers here)
    report: dict = {}
    if accelerator.is_main_process:
        report = _write(recipe, tokenizer, state, after, data, started, say, state_dict, scorer)
    accelerator.wait_for_everyone()
    return report


def _write(recipe, tokenizer, state, after, data, started, say, state_dict, scorer) -> dict:
    out = Path(recipe.output.dir).expanduser()
    model = merged_model(recipe, {k: v.detach().cpu() for k, v in state_dict.items()})
    with output_folder(recipe, say).staging() as tmp:
        if recipe.train.mode == "lora":
            if recipe.lora.save_adapter:
                model.save_pretrained(tmp / "lora-adapter")
            model = model.merge_and_unload()
        recovery = _recovery(scorer, state, model, say)
        dtype = DTYPES.get(recipe.output.dtype) or _input_dtype(recipe)
        report = _report(recipe, state, after, data, started, recovery)
        report.setdefault("name", out.name)
        kv = report.get("kv_cache")
        if kv and kv.get("dtype") != str(dtype).removeprefix("torch."):  # saved in another dtype than converted
            size = torch.empty(0, dtype=dtype).element_size()
            kv["dtype"] = str(dtype).removeprefix("torch.")
            kv["bytes_per_token_before"] = kv["elements_per_token_before"] * size
            kv["bytes_per_token_after"] = kv["elements_per_token_after"] * size
        generation = Path(recipe.model.path).expanduser() / "generation_config.json"
        files = {"recipe.yaml": recipe.to_yaml()}
        if generation.exists():
            files["generation_config.json"] = generation.read_text()
        write_model(model.to(dtype), tmp, dtype, report, recipe.output.max_shard_size, tokenizer=tokenizer,
                    files=files)
    say(f"wrote {out}")
    return report


def _recovery(scorer, state, model, say) -> dict | None:
    """Before / after distance to the source (None when recovery.against is null or a resumed run lacks the
    before-scores of its first start)."""
    if scorer is None or state.recovery_before is None:
        return None
    after = scorer.score(model)
    say(f"after uptraining, against {scorer.source_name}: KL {state.recovery_before['kl']:.4f} -> {after['kl']:.4f} "
        f"nats/token, top-1 {state.recovery_before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}")
    return {**scorer.describe(), "before": state.recovery_before, "after": after}


def _input_dtype(recipe: Recipe) -> torch.dtype:
    config = json.loads((Path(recipe.model.path).expanduser() / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def _report(recipe: Recipe, state, after: float, data, started: float, recovery: dict | None = None) -> dict:
    source_report = Path(recipe.model.path).expanduser() / "conversion.json"
    report = json.loads(source_report.read_text()) if source_report.exists() else {}
    report.pop("card_sections", None)
    uptraining = {
        "gtakit_version": gtakit.__version__,
        "input_model": recipe.model.path,
        "mode": recipe.train.mode,
        "loss": recipe.loss.kind,
        "steps": state.step,
        "tokens": state.tokens,
        "eval": {"sequences": len(data.eval), "seq_len": data.seq_len,
                 "source": recipe.data.eval or "held out from data.train"},
        "perplexity_before": state.before_perplexity,
        "perplexity_after": after,
        "teacher_perplexity": state.teacher_perplexity,
        "recovery": recovery,
        "evals": state.evals,
        "train_seconds": round(state.train_seconds, 1),
        "wall_time_s": round(time.time() - started, 1),
        "recipe": recipe.to_dict(),
    }
    report["uptraining"] = uptraining
    report["card_sections"] = [("Uptraining", _card_body(recipe, uptraining))]
    return report


def _card_body(recipe: Recipe, up: dict) -> str:
    ev = up["eval"]
    rows = ["| model | perplexity |", "|---|---|"]
    if up["teacher_perplexity"] is not None:
        rows.append(f"| teacher (`{recipe.teacher.model}`) | {up['teacher_perplexity']:.3f} |")
    rows.append(f"| converted, before uptraining | {up['perplexity_before']:.3f} |")
    rows.append(f"| after uptraining | {up['perplexity_after']:.3f} |")
    where = ", ".join(ev["source"]) if isinstance(ev["source"], list) else ev["source"]
    recovery = []
    if up.get("recovery"):
        from .recovery import card_rows

        rec = up["recovery"]
        text = ", ".join(rec["text"]) if isinstance(rec["text"], list) else rec["text"]
        recovery = [f"Distance to `{rec['against']}` on {rec['tokens']:,} tokens of {text} (windows of "
                    f"{rec['window']}):", "", *card_rows(rec), ""]
    return "\n".join([
        f"Uptrained with `gtakit finetune` (mode `{up['mode']}`, loss `{up['loss']}`) on {up['tokens']:,} tokens "
        f"in {up['steps']} optimiser steps ({up['train_seconds']:.0f} s of training).",
        "",
        f"Perplexity on {ev['sequences']} sequences of {ev['seq_len']} tokens ({where}):",
        "",
        *rows,
        "",
        *recovery,
        "The recipe (also in `recipe.yaml`; rerun it with `gtakit finetune recipe.yaml`):",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
    ])
