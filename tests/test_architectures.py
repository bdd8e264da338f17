"""POET beyond LLaMA: modules that read `.weight`, GPT-2's Conv1D, mixture-of-experts coverage."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM
from transformers.pytorch_utils import Conv1D

import poetlm
from poetlm import POETConfig


def rotate_randomly(model, std=0.1):
    with torch.no_grad():
        for i, param in enumerate(poetlm.rotation_parameters(model)):
            param.normal_(std=std, generator=torch.Generator().manual_seed(i))


def test_transformer_encoder_layer_and_multihead_attention_read_the_effective_weight():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 32)
    expected = layer(x)
    params_before = sum(p.numel() for p in layer.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        poetlm.poetize(layer, POETConfig(init="keep", block_size=8))
    # MultiheadAttention keeps q, k, v in one raw parameter: reported, not silently skipped.
    assert any("self_attn.in_proj_weight" in str(w.message) for w in caught)
    assert [name for name, _ in poetlm.poet_layers(layer)] == ["self_attn.out_proj", "linear1", "linear2"]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    rotate_randomly(layer)
    out = layer(x)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in poetlm.rotation_parameters(layer))
    # `weight` is the effective weight but not a parameter: counts, optimizers and state dicts are unchanged.
    out_proj = layer.self_attn.out_proj
    torch.testing.assert_close(out_proj.weight, out_proj.effective_weight(), rtol=0, atol=0)
    assert "weight" not in dict(out_proj.named_parameters())
    rotations = sum(p.numel() for p in poetlm.rotation_parameters(layer))
    assert sum(p.numel() for p in layer.parameters()) == params_before + rotations
    state = layer.state_dict()
    assert torch.equal(state["self_attn.out_proj.weight"], out_proj.effective_weight().detach())
    copy = poetlm.poetize(nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True),
                          POETConfig(block_size=8, exclude_modules=["in_proj_weight"]), strict=True)
    copy.load_state_dict(state)  # strict: the dense entries are accepted and ignored
    torch.testing.assert_close(copy(x), out, rtol=0, atol=1e-6)
    # The inference fast path of nn.TransformerEncoderLayer reads the weights directly too.
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(AttributeError, match="weight is computed from W0 and the rotations and cannot be set"):
        out_proj.weight = nn.Parameter(torch.zeros(32, 32))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_gpt2_conv1d_is_wrapped_and_exports_to_a_gpt2_checkpoint(tmp_path):
    model = gpt2()
    ids = torch.randint(0, 64, (2, 12))
    expected = model(ids).logits
    poetlm.poetize(model, POETConfig(init="keep", block_size=8))
    wrapped = dict(poetlm.poet_layers(model))
    assert len(wrapped) == 8 and all(isinstance(m, poetlm.POETConv1D) for m in wrapped.values())
    c_attn = wrapped["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96) and c_attn.weight.shape == (32, 96)  # Conv1D layout
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)
    rotate_randomly(model)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in poetlm.rotation_parameters(model))
    poetlm.merge(model)
    rotated = model(ids).logits.detach()
    dense = poetlm.export_dense(model)
    assert type(dense.transformer.h[0].attn.c_attn) is Conv1D
    dense.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, rotated, rtol=0, atol=1e-5)
    # The fold-every-step form (poetlm.optim.POET) draws W0 into Conv1D weights in their own layout.
    fresh = gpt2()
    weights = dict(poetlm.model.rotated_weights(fresh, POETConfig(block_size=8)))
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    reference = poetlm.poetize(gpt2(), POETConfig(block_size=8)).transformer.h[0].attn.c_attn
    assert torch.equal(weights["transformer.h.0.attn.c_attn.weight"], reference.weight)


def mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))


def test_mixture_of_experts_coverage_report_and_strict():
    model = mixtral()
    with pytest.raises(ValueError, match=r"strict=True\) refuses: 3 targeted weight\(s\).*experts\.gate_up_proj \[4, 96, 32\] "
                                         r"\(fused expert weights of MixtralExperts"):
        poetlm.poetize(model, POETConfig(block_size=8), strict=True)
    assert not list(poetlm.poet_layers(model))  # refused before anything was wrapped
    with pytest.warns(poetlm.POETWarning, match="stay dense: model.layers.0.mlp.gate.weight") as caught:
        poetlm.poetize(model, POETConfig(block_size=8))
    from poetlm.cli import _format_warning  # on the command line: one line, wherever the warning points

    warning = caught[0]
    assert _format_warning(warning.message, warning.category, "/usr/lib/torch/utils/_contextlib.py", 124) == \
        f"poetlm: warning: {warning.message}\n"
    report = poetlm.coverage(model)
    assert report.wrapped == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    reasons = {w.name: (w.reason, w.targeted) for w in report.dense}
    assert reasons["model.embed_tokens.weight"] == ("embedding", False)
    assert reasons["lm_head.weight"] == ("output head", False)
    assert reasons["model.layers.0.mlp.experts.down_proj"][1]
    assert report.wrapped_params == 4 * 32 * 32 - 2 * 2 * 32 * 8  # q, o: 32×32; k, v: 16×32 (two kv heads)
    assert "dense: model.layers.0.mlp.experts.gate_up_proj [4, 96, 32]" in str(report)
    # Excluding what cannot be wrapped is a clean, strict wrap of the attention layers.
    strict = poetlm.poetize(mixtral(), POETConfig(block_size=8, exclude_modules=["gate", "experts.gate_up_proj",
                                                                                  "experts.down_proj"]), strict=True)
    assert not [w for w in poetlm.coverage(strict).dense if w.targeted]
    with pytest.warns(UserWarning, match="experts.down_proj"):  # the fold-every-step form reports them too
        poetlm.model.rotated_weights(mixtral(), POETConfig(block_size=8))


TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
        "data.seq_len=32", "data.vocab_size=300", "batch_size=4", "eval_tokens=256", "eval_every=4",
        "checkpoint_every=4", "poet.block_size=8", "poet.merge_every=2", "progress=false", "steps=4"]


@pytest.mark.parametrize("source,method,expected", [
    ("qwen2-dir", "poet", "Qwen2ForCausalLM"),       # a directory holding config.json
    ("mistral-file", "poet-paper", "MistralForCausalLM"),  # a config.json file
    ("gpt2", "poet", "GPT2LMHeadModel"),             # a transformers model type
])
def test_train_builds_any_hf_causal_lm_config_with_preset_sizes(tmp_path, corpus, source, method, expected):
    from transformers import AutoConfig, AutoModelForCausalLM

    from poetlm.cli import main
    from poetlm.train.runs import load_run_model

    if source == "qwen2-dir":  # sizes far from the preset's: they must be replaced, the architecture kept
        AutoConfig.for_model("qwen2", hidden_size=896, num_hidden_layers=24, sliding_window=None).save_pretrained(tmp_path / "qwen2")
        source = str(tmp_path / "qwen2")
    elif source == "mistral-file":
        AutoConfig.for_model("mistral", hidden_size=4096, num_key_value_heads=8).save_pretrained(tmp_path / "mistral")
        source = str(tmp_path / "mistral" / "config.json")
    args = ["train", "--model-config", source, "--method", method, "--name", "run", "--out", str(tmp_path / "runs"),
            *TINY, f"data.data={str(corpus)!r}", f"data.cache_dir={str(corpus.parent / 'cache')!r}"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "run"
    model, _, config = load_run_model(run_dir)
    assert type(model).__name__ == expected and config.model.hf_config == source
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (32, 2, 300)
    assert main(["export", str(run_dir), str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 300, (2, 16))
    assert type(dense).__name__ == expected
    torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    # poetlm's own commands on the exported directory (eval, finetune, generate) tokenize as the run did; for qwen2
    # transformers' AutoTokenizer picks Qwen2Tokenizer, which does not
    from poetlm.train.data import PROBE_TEXT, load_tokenizer
    exported, trained = load_tokenizer(tmp_path / "dense"), load_tokenizer(run_dir / "tokenizer")
    assert type(exported) is type(trained) and exported(PROBE_TEXT)["input_ids"] == trained(PROBE_TEXT)["input_ids"]
    if source.endswith("config.json"):  # later commands rebuild the run's own architecture, not what the file says now
        Path(source).write_text(Path(source).read_text().replace('"silu"', '"relu"'))
        torch.testing.assert_close(load_run_model(run_dir)[0](ids).logits, model(ids).logits, rtol=0, atol=0)
        Path(source).unlink()
        assert main(["eval", str(run_dir)]) == 0


def test_model_config_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    from poetlm.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # "no-such-thing" is tried as a hub id last

    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    for source, message in [(str(tmp_path), "vit config, which has no causal-LM class"),
                            ("no-such-thing", "neither a config.json"),
                            ("bert", "a bert model built as a causal LM lets each position see the tokens after it"),
                            ("deepseek_v3", "has sizes no model.* key sets (q_lora_rank, kv_lora_rank")]:
        assert main(["train", "--model-config", source, "--steps", "1", "--out", str(tmp_path / "runs"),
                     "data.max_documents=20", f"data.cache_dir={str(tmp_path / 'cache')!r}"]) == 1
        assert message in capsys.readouterr().err


# The name each architecture gives its MLP width (and that a wrong mapping silently left at its default).
MLP_WIDTH = {"opt": "ffn_dim", "xglm": "ffn_dim", "falcon": "ffn_hidden_size", "gpt_neo": "intermediate_size",
             "gpt2": "n_inner", "qwen2": "intermediate_size", "qwen3": "intermediate_size", "gemma": "intermediate_size"}


def sized(hf_config, **changes):
    from poetlm.train.config import ModelConfig

    return ModelConfig(**{"hidden_size": 32, "intermediate_size": 80, "num_layers": 3, "num_heads": 4, "hf_config": hf_config,
                          **changes})


@pytest.mark.parametrize("model_type", sorted(MLP_WIDTH))
def test_model_config_builds_the_preset_sizes(model_type):
    from poetlm.train.models import build_model

    model = build_model(sized(model_type), 300, 48)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 3, 4)
    assert (getattr(config, MLP_WIDTH[model_type]), config.max_position_embeddings, config.vocab_size) == (80, 48, 300)
    # The modules are built at these sizes: an MLP 80 wide, three blocks (GPT-Neo: one attention kind per layer).
    assert any(80 in p.shape for p in model.parameters())
    if getattr(config, "head_dim", None) is not None:  # Qwen3, Gemma keep a head size of their own (128, 256) unless set
        assert config.head_dim == 32 // 4
    assert max(max(p.shape) for p in model.parameters() if p.dim() == 2 and 300 not in p.shape) <= 3 * 32  # at most fused q,k,v
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    assert len(blocks) == 3


def test_gpt_neo_config_json_gets_attention_kinds_for_the_new_layer_count(tmp_path):
    from transformers import AutoConfig

    from poetlm.train.models import hf_model_config

    AutoConfig.for_model("gpt_neo").save_pretrained(tmp_path)  # 24 layers: attention_layers has 24 entries
    config = hf_model_config(sized(str(tmp_path)), 300, 48)
    assert config.attention_layers == ["global", "local", "global"] and config.num_layers == 3


def test_model_config_key_value_heads_are_applied_or_refused():
    from poetlm.train.models import ModelError, build_model, hf_model_config

    assert hf_model_config(sized("qwen2", num_kv_heads=2), 300, 48).num_key_value_heads == 2
    falcon = build_model(sized("falcon"), 300, 48)  # Falcon's default is multi-query: one key/value head
    assert not falcon.config.multi_query and falcon.transformer.h[0].self_attention.query_key_value.out_features == 3 * 32
    assert hf_model_config(sized("falcon", num_kv_heads=1), 300, 48).multi_query
    with pytest.raises(ModelError, match=r"falcon has either 1 key/value head .* not model.num_kv_heads=2"):
        hf_model_config(sized("falcon", num_kv_heads=2), 300, 48)
    with pytest.raises(ModelError, match=r"gpt2 has one key/value head per attention head: model.num_kv_heads=2"):
        hf_model_config(sized("gpt2", num_kv_heads=2), 300, 48)


def test_model_config_rope_theta_is_applied_or_refused():
    from poetlm.train.models import ModelError, hf_model_config

    assert hf_model_config(sized("qwen2", rope_theta=5.0), 300, 48).rope_parameters["rope_theta"] == 5.0
    with pytest.raises(ModelError, match=r"gpt2 has no rotary position embedding: model.rope_theta=5.0 cannot be applied"):
        hf_model_config(sized("gpt2", rope_theta=5.0), 300, 48)


@pytest.mark.parametrize("model_type,hidden,rotary,fits", [("qwen2", 10, 5, 12), ("phi", 12, 3, 16)])
def test_an_odd_rotary_dimension_is_refused_in_one_line_and_rope_free_models_take_any_head_size(model_type, hidden, rotary, fits):
    from poetlm.train.models import ModelError, build_model

    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ModelError, match=rf"^a {model_type} model's rotary position embedding needs an even number of rotary "
                                         rf"dimensions, and heads of {hidden // 2} .* have {rotary}; e.g. model.hidden_size={fits}$"):
        build_model(sized(model_type, hidden_size=hidden, num_heads=2), 300, 48)
    build_model(sized(model_type, hidden_size=fits, num_heads=2), 300, 48)(ids)  # the size suggested runs
    build_model(sized("gpt2", hidden_size=hidden, num_heads=2), 300, 48)(ids)  # no RoPE: an odd head size is fine


def test_model_config_refuses_sizes_it_cannot_set_and_transformers_errors_in_one_line(tmp_path, capsys):
    from poetlm.cli import main
    from poetlm.train.models import ModelError, hf_model_config

    with pytest.raises(ModelError, match=r"^model type bloom has no setting for model.intermediate_size \(none of "
                                         r"intermediate_size, n_inner, ffn_dim"):
        hf_model_config(sized("bloom"), 300, 48)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_act": 5}')  # transformers' own validation
    with pytest.raises(ModelError, match=r"^transformers cannot build a qwen2 model at the preset's sizes \(.*hidden_act.*\); "
                                         r"change the model.\* sizes"):
        hf_model_config(sized(str(tmp_path)), 300, 48)
    assert main(["train", "--model-config", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "runs"),
                 "data.max_documents=20", f"data.cache_dir={str(tmp_path / 'cache')!r}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "cannot build" in line] == [
        line for line in err.splitlines() if line.startswith("poetlm: error: transformers cannot build a qwen2 model")]


def test_runs_from_before_the_saved_architecture_rebuild_as_they_were_built():
    """A run without hf_config.json (made before runs saved it) has Qwen3's own head size in its checkpoints."""
    from poetlm.train.models import build_model

    assert build_model(sized("qwen3"), 300, 48).config.head_dim == 8
    assert build_model(sized("qwen3"), 300, 48, legacy=True).config.head_dim == 128
    assert build_model(sized("gpt2"), 300, 4).config.n_positions == 4  # the causality probe fits a short context
