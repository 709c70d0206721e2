"""Tiny random source checkpoints (Llama, Mistral, Qwen2) written to disk like real ones."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)

SOURCES = {
    "llama-mha": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=4, head_dim=16)),
    "llama-gqa-llama3rope": lambda: LlamaForCausalLM(
        LlamaConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=LLAMA3_ROPE,
        )
    ),
    "mistral-gqa": lambda: MistralForCausalLM(
        MistralConfig(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=None)
    ),
    "llama-3-layers": lambda: LlamaForCausalLM(
        LlamaConfig(**dict(COMMON, num_hidden_layers=3), num_key_value_heads=2, head_dim=16)
    ),
    # Windows of 8 tokens: the tests' sequences run well past them.
    "mistral-sliding": lambda: MistralForCausalLM(
        MistralConfig(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8)
    ),
    "qwen2-sliding-layer": lambda: Qwen2ForCausalLM(
        Qwen2Config(**COMMON, num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ),
    "qwen2-bias": lambda: Qwen2ForCausalLM(
        Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False)
    ),
    # Phi-3: fused qkv_proj and gate_up_proj, MHA.
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, num_key_value_heads=4)),
    # MoE families: checkpoints hold one tensor per expert, transformers 5 fuses them at load time.
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                        num_experts_per_tok=2, sliding_window=8)),
    "qwen2-moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, mlp_only_layers=[1])),
    "qwen3-moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)),
    # SmolLM3: layer 1 of 2 has no RoPE (NoPE).
    "smollm3": lambda: SmolLM3ForCausalLM(SmolLM3Config(**COMMON, num_key_value_heads=2, no_rope_layer_interval=2)),
    # GPT-NeoX (Pythia): partial rotary (25% of each head), fused per-head qkv, biases, parallel residual.
    "gpt-neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON, rotary_pct=0.25)),
    # GPT-2: learned positions (no RoPE), Conv1D weights, fused c_attn, biases.
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    # QK-norm families (their norm weights are randomised by write_source so that they matter).
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**COMMON, num_key_value_heads=2)),
    # Gemma 2 in small: soft-capped scores (cap 5 so that it bites), alternating sliding/full layers.
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        **COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
        query_pre_attn_scalar=24)),
    # Gemma 3 in small: MQA, head_dim above hidden/heads, query_pre_attn_scalar != head_dim, two sliding layers
    # (window 8, their own RoPE base) then a full one, scaled embeddings and sandwich norms.
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **dict(COMMON, num_hidden_layers=3), num_key_value_heads=1, head_dim=32, sliding_window=8,
        query_pre_attn_scalar=24, layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<pad>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def write_source(name: str, folder: Path, seed: int = 0, shard_size: str = "60KB") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = SOURCES[name]().eval()
    with torch.no_grad():  # random init zeroes biases; make them matter
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0, 0.2)
            elif "q_norm" in param_name or "k_norm" in param_name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size=shard_size)
    tiny_tokenizer().save_pretrained(folder)
    return model


def random_text(words: int = 3000, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (words,), generator=generator)
    return " ".join(f"w{int(i)}" for i in ids)


def token_ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def check_generates_with_cache(out: Path, per_layer: int, layers: int = 2) -> dict:
    """Load a converted folder with remote code, generate 6 greedy tokens and check the compressed cache holds
    exactly `per_layer` elements per token and layer (also in conversion.json, which is returned)."""
    import json

    from transformers import AutoModelForCausalLM

    from gtakit.models import output_cache

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        gen = model.generate(token_ids(1, 5), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True)
    assert gen.sequences.shape[1] == 11
    cache = output_cache(gen)
    assert cache.get_seq_length() == 5 + 6 - 1
    held = sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)
    assert held == per_layer * layers
    report = json.loads((Path(out) / "conversion.json").read_text())
    assert report["kv_cache"]["elements_per_token_after"] == per_layer * layers
    return report
