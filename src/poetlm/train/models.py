"""Models built from a config with `transformers`: LLaMA by default, any causal LM via model.hf_config."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from ..layer import POETLinear, is_conv1d
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


def _read_hf_config(source: str) -> dict:
    """model.hf_config as a dict: a config.json file or its directory, a model type, or a hub id."""
    from transformers import CONFIG_MAPPING, AutoConfig

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ModelError(f"model.hf_config={source!r}: {path} is not valid JSON ({error})") from None
    if source in CONFIG_MAPPING:
        return {"model_type": source}
    honor_offline_env()
    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as error:
        raise ModelError(f"model.hf_config={source!r} is neither a config.json (or a directory holding one), nor a "
                         f"transformers model type (e.g. qwen2, mistral, gpt2), nor a reachable hub id: {error}") from None


def hf_model_config(model: ModelConfig, vocab_size: int, max_seq_len: int) -> PretrainedConfig:
    """The architecture of model.hf_config with the preset's sizes, vocabulary and context length."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    values = _read_hf_config(model.hf_config)
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"model.hf_config={model.hf_config!r} has model_type={model_type!r}, which this transformers "
                         "does not know (upgrade transformers, or check the file)")
    config_class = CONFIG_MAPPING[model_type]
    if config_class not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"model.hf_config={model.hf_config!r} is a {model_type} config, which has no causal-LM "
                         "class in transformers (poetlm trains next-token prediction)")
    defaults = config_class()
    sizes = {"vocab_size": vocab_size, "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
             "num_attention_heads": model.num_heads, "max_position_embeddings": max_seq_len,
             "tie_word_embeddings": model.tie_embeddings}
    # Names differ between architectures (GPT-2: n_inner; no grouped-query attention; rope or not).
    for name in ("intermediate_size", "n_inner"):
        if hasattr(defaults, name):
            sizes[name] = model.intermediate_size
            break
    if hasattr(defaults, "num_key_value_heads"):
        sizes["num_key_value_heads"] = model.num_kv_heads or model.num_heads
    if isinstance(getattr(defaults, "rope_parameters", None), dict):
        sizes["rope_parameters"] = {**(values.get("rope_parameters") or defaults.rope_parameters), "rope_theta": model.rope_theta}
    for name, value in sizes.items():
        values[config_class.attribute_map.get(name, name)] = value
    if len(values.get("layer_types") or []) != model.num_layers:
        values.pop("layer_types", None)  # per-layer attention kinds follow the layer count: let the config derive them
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = values.get(name, getattr(defaults, name, None))
        if isinstance(token, int) and token >= vocab_size:
            values[name] = None  # an id of the original vocabulary, outside poetlm's tokenizer
    return config_class(**{k: v for k, v in values.items() if k not in ("model_type", "transformers_version", "architectures")})


def build_model(model: ModelConfig, vocab_size: int, max_seq_len: int) -> nn.Module:
    """A fresh causal LM of the configured architecture and size."""
    if model.hf_config is None:
        return build_llama(model, vocab_size, max_seq_len)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_model_config(model, vocab_size, max_seq_len))


def load_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """The pretrained model to finetune (finetune.base_model), or a fresh model built from config.model."""
    if not config.finetuning:
        return build_model(config.model, vocab_size, config.data.seq_len)
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
    """The linears (Conv1D, POET layers) inside the decoder blocks: what the paper's "# params" counts.

    Blocks are the entries of the model's module lists (model.layers.N in LLaMA, transformer.h.N in GPT-2).
    """
    lists = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    return [(name, module) for name, module in model.named_modules()
            if (isinstance(module, (nn.Linear, POETLinear)) or is_conv1d(module)) and any(name.startswith(p) for p in lists)]
