"""LLaMA models built from a config with `transformers` (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..layer import POETLinear
from .config import ModelConfig, TrainConfig
from .hub import honor_offline_env


class ModelError(ValueError):
    """The model to finetune cannot be loaded or does not fit the data."""


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


def load_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """The pretrained model to finetune (finetune.base_model), or a fresh LLaMA built from config.model."""
    if not config.finetuning:
        return build_llama(config.model, vocab_size, config.data.seq_len)
    from transformers import AutoModelForCausalLM

    source = config.finetune.base_model
    honor_offline_env()
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:
        where = "is not a model directory here" if not Path(source).exists() else "could not be loaded"
        raise ModelError(f"finetune.base_model={source!r} {where}: {error}. Offline, pass a local directory "
                         "written by save_pretrained (or by poetlm export); a hub id needs network access.") from None
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ModelError(f"the tokenizer has {vocab_size} tokens but {source} embeds only "
                         f"{model.get_input_embeddings().num_embeddings}: use the model's own tokenizer (leave data.tokenizer unset)")
    return model


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears (or POET layers) inside the decoder blocks: what the paper's "# params" counts."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, POETLinear)) and ".layers." in f".{name}"]
