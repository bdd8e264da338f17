"""LLaMA models built from a config with `transformers` (no hub access needed)."""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..layer import POETLinear
from .config import ModelConfig


def llama_config(model: ModelConfig, vocab_size: int, max_seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads or model.num_heads,
        max_position_embeddings=max_seq_len,
        rope_theta=model.rope_theta,
        tie_word_embeddings=model.tie_embeddings,
    )


def build_llama(model: ModelConfig, vocab_size: int, max_seq_len: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(llama_config(model, vocab_size, max_seq_len))


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears (or POET layers) inside the decoder blocks: what the paper's "# params" counts."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, POETLinear)) and ".layers." in f".{name}"]
