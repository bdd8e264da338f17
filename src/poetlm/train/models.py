"""Models built from a config with `transformers`: LLaMA by default, any causal LM via model.hf_config."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from ..layer import POETLinear, is_conv1d
from ..serialization import LoadError, dtype_argument, load_dense
from . import files
from .config import ModelConfig, TrainConfig
from .data import TOKENIZER_FILES, DataError, is_hub_id, load_tokenizer
from .hub import honor_offline_env


class ModelError(ValueError):
    """The model to finetune cannot be loaded or does not fit the data."""


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(tokenizer) -> dict[str, int]:
    """The config's bos/eos/pad ids for a model trained from scratch on `tokenizer`'s tokens.

    Documents reach the model separated by the tokenizer's end-of-text, so that id ends generation and
    starts it without a prompt; a tokenizer without its own bos or pad token gets it there too. (A
    model's own defaults, LLaMA's 1 and 2, are ordinary tokens of poetlm's tokenizers: byte tokens
    such as '"', at which generation would stop.)
    """
    eos = int(tokenizer.eos_token_id)
    return {name: eos if getattr(tokenizer, name) is None else int(getattr(tokenizer, name)) for name in SPECIAL_TOKENS}


def _special_tokens(ids: dict[str, int] | None) -> dict[str, int | None]:
    """A fresh model's special token ids: `ids` (`token_ids`), or none at all; never an architecture's
    defaults, which are ids of another vocabulary."""
    return {name: (ids or {}).get(name) for name in SPECIAL_TOKENS}


def llama_config(model: ModelConfig, vocab_size: int, max_seq_len: int, ids: dict[str, int] | None = None) -> LlamaConfig:
    return LlamaConfig(
        **_special_tokens(ids),
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


def build_llama(model: ModelConfig, vocab_size: int, max_seq_len: int, ids: dict[str, int] | None = None) -> LlamaForCausalLM:
    return LlamaForCausalLM(llama_config(model, vocab_size, max_seq_len, ids))


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


# Each preset size goes to every name an architecture gives it (BART-style decoders keep decoder_* sizes of
# their own). The MLP width has the most names: intermediate_size (LLaMA and most), n_inner (GPT-2, GPT-J,
# CodeGen), ffn_dim (OPT, XGLM), ffn_hidden_size (Falcon), encoder/decoder_ffn_dim (BART-style), dff (CTRL),
# dim_ff (CPM-Ant), d_inner (XLNet), feed_forward_size (Reformer).
SIZE_NAMES = {
    "model.hidden_size": ("hidden_size",),
    "model.num_layers": ("num_hidden_layers", "decoder_layers"),
    "model.num_heads": ("num_attention_heads", "decoder_attention_heads"),
    "model.intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "encoder_ffn_dim",
                                "decoder_ffn_dim", "dff", "dim_ff", "d_inner", "feed_forward_size"),
}
KV_HEAD_NAMES = ("num_key_value_heads", "num_kv_heads")
OTHER_ARCHITECTURE = "use another architecture (e.g. --model-config qwen2 or gpt2), or leave model.hf_config unset for LLaMA"


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _build_error(model_type: str, error: BaseException) -> ModelError:
    return ModelError(f"transformers cannot build a {model_type} model at the preset's sizes ({_one_line(error)}); "
                      f"change the model.* sizes to ones {model_type} allows, or {OTHER_ARCHITECTURE}")


def _has(config: PretrainedConfig, name: str) -> bool:
    """Whether the architecture has this setting (some raise on reading one they lack, or one set per layer)."""
    try:
        return hasattr(config, name)
    except Exception:  # transformers raises assorted types
        return False


# Sizes that no preset key sets (multi-head latent attention's ranks and head parts): left at the architecture's
# own, the model would be trained at another size than the preset's.
UNSET_SIZES = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _preset_sizes(model: ModelConfig, model_type: str, defaults: PretrainedConfig, setting, legacy: bool) -> dict:
    """The preset's sizes under the names this architecture reads; a size it has no name for is refused."""
    unset = [name for name in UNSET_SIZES if setting(name) is not None]
    if unset and not legacy:
        raise ModelError(f"a {model_type} model has sizes no model.* key sets ({', '.join(unset)}), so it would not be "
                         f"built at the preset's sizes; {OTHER_ARCHITECTURE}")
    sizes = {}
    values = {"model.hidden_size": model.hidden_size, "model.num_layers": model.num_layers,
              "model.num_heads": model.num_heads, "model.intermediate_size": model.intermediate_size}
    for key, names in SIZE_NAMES.items():
        present = [name for name in names if _has(defaults, name)]
        if not present:
            raise ModelError(f"model type {model_type} has no setting for {key} (none of {', '.join(names)}), so it "
                             f"cannot be built at the preset's sizes; {OTHER_ARCHITECTURE}")
        sizes.update(dict.fromkeys(present, values[key]))
    heads, kv = model.num_heads, model.num_kv_heads or model.num_heads
    # Falcon and GPTBigCode switch between one key/value head (multi-query) and one per head.
    switched = _has(defaults, "multi_query") and not setting("new_decoder_architecture")
    if switched:
        if kv not in (1, heads):
            raise ModelError(f"a model of type {model_type} has either 1 key/value head (multi_query) or one per attention head, "
                             f"not model.num_kv_heads={kv}; set it to 1 or leave it null (= model.num_heads)")
        sizes["multi_query"] = kv == 1
    kv_names = [name for name in KV_HEAD_NAMES if _has(defaults, name)]
    if kv_names:
        sizes.update(dict.fromkeys(kv_names, kv))
    elif not switched and kv != heads:
        raise ModelError(f"a model of type {model_type} has one key/value head per attention head: model.num_kv_heads={kv} "
                         "cannot be applied; leave it null (= model.num_heads)")
    return sizes


def hf_model_config(model: ModelConfig, vocab_size: int, max_seq_len: int, ids: dict[str, int] | None = None,
                    legacy: bool = False) -> PretrainedConfig:
    """The architecture of model.hf_config with the preset's sizes, vocabulary and context length, and the
    special token ids `ids` (`token_ids`: the source's belong to another vocabulary). `legacy`: as poetlm built
    it before runs saved their architecture (`ARCHITECTURE`), for such a run: the architecture's own head size.

    Every size is applied or refused: a config that would build another size than the preset's is a ModelError.
    """
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
    try:
        defaults = config_class()
    except Exception as error:  # transformers raises assorted types
        raise _build_error(model_type, error) from None
    field = config_class.attribute_map.get

    def setting(name):
        """The source's value of a setting (under its own or its mapped name), else the architecture's default."""
        return values[field(name, name)] if field(name, name) in values else getattr(defaults, name, None)

    source_layers = setting("num_hidden_layers")
    sizes = {"vocab_size": vocab_size, "tie_word_embeddings": model.tie_embeddings, **_preset_sizes(model, model_type, defaults, setting, legacy)}
    # Qwen3, Gemma: a head size of their own (128, 256) would make q, k, v wider than hidden (Falcon derives it)
    if _has(defaults, "head_dim") and not isinstance(getattr(type(defaults), "head_dim", None), property) and not legacy:
        sizes["head_dim"] = model.hidden_size // model.num_heads
    if _has(defaults, "max_position_embeddings"):  # others (ALiBi, recurrent models) have no context limit to set
        sizes["max_position_embeddings"] = max_seq_len
    if isinstance(getattr(defaults, "rope_parameters", None), dict):
        sizes["rope_parameters"] = {**(values.get("rope_parameters") or defaults.rope_parameters), "rope_theta": model.rope_theta}
    elif model.rope_theta != ModelConfig.rope_theta:
        raise ModelError(f"a model of type {model_type} has no rotary position embedding: model.rope_theta={model.rope_theta} "
                         "cannot be applied; leave it at its default")
    for name, value in sizes.items():
        values[field(name, name)] = value
    _fit_layer_lists(values, config_class, setting, model.num_layers)
    values.update(_special_tokens(ids))
    try:
        config = config_class(**{k: v for k, v in values.items() if k not in ("model_type", "transformers_version", "architectures")})
    except Exception as error:  # transformers raises assorted types
        raise _build_error(model_type, error) from None
    _check_sizes(config, model_type, sizes, source_layers, model.num_layers)
    _check_rotary(config, model_type)
    return config


def _check_rotary(config: PretrainedConfig, model_type: str) -> None:
    """Refuse an odd rotary dimension (RoPE turns pairs of dimensions), which some architectures (qwen2, phi)
    only meet in their first forward pass, as a tensor size mismatch."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict):  # no RoPE (GPT-2): any head size
        return
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    if int(head * factor) % 2:
        fits = next(size for size in itertools.count(head + 1) if int(size * factor) % 2 == 0)
        raise ModelError(f"a {model_type} model's rotary position embedding needs an even number of rotary dimensions, and "
                         f"heads of {head} (model.hidden_size / model.num_heads) have {int(head * factor)}; "
                         f"e.g. model.hidden_size={config.num_attention_heads * fits}")


def _fit_layer_lists(values: dict, config_class, setting, num_layers: int) -> None:
    """Per-layer settings for the preset's layer count: derived by the config where it can, else the pattern repeated."""
    if len(values.get("layer_types") or []) != num_layers:
        values.pop("layer_types", None)  # per-layer attention kinds follow the layer count: let the config derive them
    expand = getattr(config_class, "expand_attention_types_params", None)
    if expand is not None and setting("attention_types") is not None:
        # GPT-Neo: [[kinds, repeats], ...] expanded into attention_layers, which must have one kind per layer.
        kinds = expand(setting("attention_types"))
        values["attention_types"] = [[[kinds[i % len(kinds)] for i in range(num_layers)], 1]]
        values.pop("attention_layers", None)


def _check_sizes(config: PretrainedConfig, model_type: str, sizes: dict, source_layers, num_layers: int) -> None:
    """The config keeps every size it was given, and holds no per-layer list left at the source's layer count."""
    for name, value in sizes.items():
        kept = getattr(config, name, None) if _has(config, name) else None
        if name != "rope_parameters" and kept != value:
            raise ModelError(f"a {model_type} config does not keep {name}={value!r} (it sets {kept!r}), so it cannot be "
                             f"built at the preset's sizes; {OTHER_ARCHITECTURE}")
    if isinstance(source_layers, int) and source_layers not in (num_layers, 1):
        stale = [name for name, value in vars(config).items() if isinstance(value, list) and len(value) == source_layers
                 and not name.endswith("token_id")]
        if stale:
            raise ModelError(f"a {model_type} config's {', '.join(stale)} list(s) one entry per layer of its {source_layers} "
                             f"layers, which poetlm cannot derive for model.num_layers={num_layers}; write a config.json "
                             f"with {num_layers} entries in each and pass it as --model-config")


def build_model(model: ModelConfig, vocab_size: int, max_seq_len: int, ids: dict[str, int] | None = None,
                legacy: bool = False) -> nn.Module:
    """A fresh causal LM of the configured architecture and size (`ids`: its special tokens, `token_ids`;
    `legacy`: see hf_model_config)."""
    if model.hf_config is None:
        return build_llama(model, vocab_size, max_seq_len, ids)
    from transformers import AutoModelForCausalLM

    config = hf_model_config(model, vocab_size, max_seq_len, ids, legacy)
    try:
        built = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # transformers raises assorted types
        raise _build_error(config.model_type, error) from None
    if not legacy:  # a run that trained already is rebuilt as it was
        _refuse_bidirectional(built, config.model_type, vocab_size)
    return built


@torch.no_grad()
def _refuse_bidirectional(model: nn.Module, model_type: str, vocab_size: int) -> None:
    """Refuse a model whose prediction at a position sees later tokens (BERT and other encoders given a causal
    LM head): it would train and report a perplexity that is no language model's. Checked by what it computes:
    the logits before the last position must not move when only the last token changes."""
    training = model.training
    model.eval()
    length = min(8, context_length(model) or 8)  # learned positions end at the context (seq_len)
    if length < 2:
        return
    ids = torch.arange(length).remainder(vocab_size).unsqueeze(0)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab_size
    try:
        before, after = model(input_ids=ids).logits[0, :-1], model(input_ids=changed).logits[0, :-1]
    except Exception as error:  # transformers raises assorted types; training's first step would fail the same way
        raise _build_error(model_type, error) from None
    finally:
        model.train(training)
    if not torch.allclose(before, after, rtol=0, atol=1e-6):
        raise ModelError(f"a {model_type} model built as a causal LM lets each position see the tokens after it (an "
                         f"encoder's bidirectional attention), so it cannot learn next-token prediction; {OTHER_ARCHITECTURE}")


# A pretraining run's architecture as built from model.hf_config (preset sizes applied): a resume, eval or
# export rebuilds it from this file, not from the file or type model.hf_config names, which may have changed.
ARCHITECTURE = "hf_config.json"


def save_architecture(model: nn.Module, config: TrainConfig, run_dir: Path) -> None:
    if config.model.hf_config is not None and not config.finetuning:
        files.write_text(run_dir / ARCHITECTURE, model.config.to_json_string())  # atomic, as the run's other records


def _saved_architecture(path: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        values = json.loads(path.read_text())
        config = AutoConfig.for_model(**values)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelError(f"{path} (the run's architecture) cannot be read ({_one_line(error)}); restore it from a copy "
                         "of the run directory") from None
    return AutoModelForCausalLM.from_config(config)


def load_model(config: TrainConfig, tokenizer, run_dir: Path | None = None) -> nn.Module:
    """The pretrained model to finetune (finetune.base_model), or a fresh model built from config.model for
    `tokenizer`'s tokens (as the run in `run_dir` built it, if it saved its architecture)."""
    vocab_size = len(tokenizer)
    if not config.finetuning:
        if run_dir is not None and (run_dir / ARCHITECTURE).is_file():
            return _saved_architecture(run_dir / ARCHITECTURE)
        return build_model(config.model, vocab_size, config.data.seq_len, token_ids(tokenizer), legacy=run_dir is not None)
    from transformers import AutoModelForCausalLM

    source = config.finetune.base_model
    honor_offline_env()
    # fp32 master weights whatever the checkpoint stores (most are bf16): POET folds rotations into them and
    # keeps their spectrum only in fp32, and AdamW's small updates would round away in bf16. dtype=bf16 trains
    # in bf16 through autocast, as pretraining does.
    fp32 = dtype_argument(torch.float32)
    if Path(source).expanduser().is_dir():
        # The loader of eval and generate: a damaged directory, or weights that leave part of the model its
        # config.json describes at random, is refused before any training on it.
        try:
            model = load_dense(AutoModelForCausalLM, Path(source).expanduser(), **fp32)
        except LoadError as error:
            raise ModelError(f"finetune.base_model: {error}") from None
    else:
        model = _hub_model(source, fp32)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        embeds = model.get_input_embeddings().num_embeddings
        fix = ("its own tokenizer and weights disagree (a damaged or mismatched base): point data.tokenizer at the "
               "tokenizer the model was trained with" if config.data.tokenizer is None else
               "use the model's own tokenizer (leave data.tokenizer unset)")
        raise ModelError(f"the tokenizer has {vocab_size} tokens but {source} embeds only {embeds}: {fix}")
    check_context(model, config.data.seq_len, "data.seq_len={}", source)
    return model


def _hub_model(source: str, kwargs: dict) -> nn.Module:
    """A base model named by its hub id (or a path that does not exist, which from_pretrained reads as one)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        where = "is not a model directory here" if not Path(source).exists() else "could not be loaded"
        raise ModelError(f"finetune.base_model={source!r} {where}: {error}. Offline, pass a local directory "
                         "written by save_pretrained (or by poetlm export); a hub id needs network access.") from None


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (GPT-2's n_positions too); None for models without a limit."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_context(model: nn.Module, seq_len: int, setting: str, source) -> None:
    """Refuse sequences longer than the model's context: learned positions run out (an IndexError), and rotary
    ones silently go where the model never was. `setting` formats the value as the user gives it."""
    context = context_length(model)
    if context is not None and seq_len > context:
        raise ModelError(f"{setting.format(seq_len)} is longer than the context of {source} ({context} tokens, its "
                         f"max_position_embeddings); use {setting.format(context)} or less")


def data_tokenizer(config: TrainConfig) -> str | None:
    """The tokenizer the run's data is tokenized with: data.tokenizer, else the base model's own when finetuning
    (None: train one). A base model directory with a tokenizer of its own refuses a data.tokenizer with another
    vocabulary, whose token ids its embeddings would read as other tokens, unless finetune.allow_other_tokenizer."""
    given, base = config.data.tokenizer, config.finetune.base_model
    if not config.finetuning:
        return given
    base_dir = Path(base).expanduser()
    own_tokenizer = any((base_dir / name).is_file() for name in TOKENIZER_FILES)
    if given is None:
        # Found out here, before the weights are loaded: say so about the model, not about a tokenizer.
        if base_dir.is_dir() and not own_tokenizer:
            raise ModelError(f"finetune.base_model={base!r} has no tokenizer files (tokenizer.json, …): pass a model "
                             "directory written with its tokenizer (poetlm export writes both; for a run directory, "
                             "its final/), or set data.tokenizer to the tokenizer the model was trained with")
        if base_dir.is_file() or not (base_dir.exists() or is_hub_id(base)):
            raise ModelError(f"finetune.base_model={base!r} {'is a file' if base_dir.is_file() else 'does not exist'}: pass "
                             "a model directory (save_pretrained, poetlm export, or a run directory's final/) or a hub id")
        return base  # a model directory, or a hub id whose tokenizer comes from the hub too
    if not own_tokenizer:
        return given
    theirs, own = load_tokenizer(given).get_vocab(), _vocabulary(base_dir)
    if own is None or theirs == own:
        return given
    same = len(theirs.items() & own.items())
    problem = (f"data.tokenizer={given!r} is not the tokenizer of {base} (vocabularies of {len(theirs)} and {len(own)} "
               f"tokens, {same} of them with the same id): the model would read its token ids as other tokens")
    if not config.finetune.allow_other_tokenizer:
        raise ModelError(f"{problem}. Leave data.tokenizer unset to use the model's own, or set "
                         "finetune.allow_other_tokenizer=true if that is what you mean")
    print(f"poetlm: warning: {problem} (allowed by finetune.allow_other_tokenizer)", file=sys.stderr)
    return given


def _vocabulary(path: Path) -> dict | None:
    """A tokenizer directory's vocabulary; None when it cannot be loaded (then there is nothing to compare)."""
    try:
        return load_tokenizer(path).get_vocab()
    except DataError:
        return None


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears (Conv1D, POET layers) inside the decoder blocks: what the paper's "# params" counts.

    Blocks are the entries of the model's module lists (model.layers.N in LLaMA, transformer.h.N in GPT-2).
    """
    lists = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    return [(name, module) for name, module in model.named_modules()
            if (isinstance(module, (nn.Linear, POETLinear)) or is_conv1d(module)) and any(name.startswith(p) for p in lists)]
