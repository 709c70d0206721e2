"""Training modes (which parameters learn) and the losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gtakit.errors import GtakitError

from .recipe import LoraSection

# The RoPE key projection is new (it did not exist in the source) and small, so LoRA trains it in full.
DEFAULT_MODULES_TO_SAVE = ("k_rope_proj",)


def attention_attribute(model: nn.Module) -> str:
    """`self_attn` for Llama-style families: the config names the attribute that holds each layer's attention."""
    return getattr(model.config, "gtakit_attention_name", "self_attn")


def attention_marker(model: nn.Module) -> str:
    return f".{attention_attribute(model)}."


def attention_modules(model: nn.Module, attribute: str) -> list[nn.Module]:
    """The modules held under ATTRIBUTE (one per decoder layer), in layer order."""
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == attribute]


def is_attention_param(model: nn.Module, name: str) -> bool:
    return attention_marker(model) in name


def attention_linear_names(model: nn.Module) -> list[str]:
    """Short names of the Linear layers inside the attention blocks (q_proj, kv_down_proj, ...), in order."""
    names: list[str] = []
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and attention_marker(model) in f".{full}." and module.weight.numel() > 0:
            short = full.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def freeze_all_but_attention(model: nn.Module) -> None:
    """`attention` mode: only the converted attention (every parameter under `*.self_attn.*`) trains."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_attention_param(model, name))


def lora_config(model: nn.Module, section: LoraSection):
    from peft import LoraConfig

    present = attention_linear_names(model)
    to_save = list(section.modules_to_save) if section.modules_to_save is not None else [
        m for m in DEFAULT_MODULES_TO_SAVE if m in present
    ]
    targets = list(section.target_modules) if section.target_modules is not None else [
        m for m in present if m not in to_save
    ]
    all_linear = {full.rsplit(".", 1)[-1] for full, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    for name in targets + to_save:
        if name not in all_linear:
            raise GtakitError(f"lora: the model has no module named {name!r} (linear layers: {sorted(all_linear)})")
    if not targets:
        raise GtakitError("lora.target_modules is empty")
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_mode(model: nn.Module, mode: str, lora: LoraSection) -> nn.Module:
    """Set `requires_grad` for the training mode; `lora` wraps the model in a peft model."""
    if mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if mode == "attention":
        freeze_all_but_attention(model)
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, lora))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a packed batch (every position is a real token)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions, mean per token, times T^2
    (Hinton et al.) so the gradient scale does not shrink with the temperature."""
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        # Padded vocabularies differ in size only by unused rows; compare the shared part.
        vocab = min(vocab, teacher_logits.shape[-1])
        student_logits, teacher_logits = student_logits[..., :vocab], teacher_logits[..., :vocab]
    log_p_student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


class AttentionOutputs:
    """Each given module's output during one forward, in order (forward hooks, removed on leaving the block)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._keep) for m in modules]

    def _keep(self, module: nn.Module, args, output) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> "AttentionOutputs":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def attention_matching(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ||a_student - a_teacher||^2 / ||a_teacher||^2: relative, so layers whose outputs are
    large (a few massive directions in Qwen2.5's early layers) do not drown the others."""
    errors = [(s.float() - t.to(s.device).float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
              for s, t in zip(student, teacher, strict=True)]
    return torch.stack(errors).mean()
