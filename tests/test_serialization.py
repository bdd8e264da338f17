"""poetlm.save_pretrained / from_pretrained, and what plain transformers loaders see in POET directories."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import poetlm
from poetlm.serialization import CONFIG_NAME, STATE_NAME, LoadError

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def llama(tie=True):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # training steps comparable


def trained(model, config=None, steps=3, merge_at=(2,)):
    """A poetized model a few AdamW steps in, merged once, with the rotations nonzero at the end."""
    poetlm.poetize(model, config or poetlm.POETConfig(block_size=8))
    opt = torch.optim.AdamW(poetlm.param_groups(model, lr_base=1e-2, lr_poet=1e-2, weight_decay=0.0))
    for step in range(1, steps + 1):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        if step in merge_at:
            poetlm.merge(model, opt)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("make", [llama, gpt2])
def test_round_trip_is_exact_and_training_continues(tmp_path, make):
    model = trained(make())
    for param in model.parameters():  # which parameters train is part of what is saved
        if param.dim() == 1:
            param.requires_grad_(False)
    poetlm.save_pretrained(model, tmp_path)
    loaded = poetlm.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # W0, rotations, coordinates, merge counts, probes
    assert {int(layer.merge_count) for _, layer in poetlm.poet_layers(loaded)} == {1}
    assert [type(m) for _, m in poetlm.poet_layers(loaded)] == [type(m) for _, m in poetlm.poet_layers(model)]
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(layer.config == poetlm.POETConfig(block_size=8) for _, layer in poetlm.poet_layers(loaded))
    for m in (model, loaded):  # the same next step and the same next merge
        m.train()
        opt = torch.optim.AdamW(poetlm.param_groups(m, lr_base=1e-2, lr_poet=1e-2, weight_decay=0.0))
        m(IDS, labels=IDS).loss.backward()
        opt.step()
        poetlm.merge(m, opt)
    assert torch.equal(logits(loaded.eval()), logits(model.eval()))


def test_plain_transformers_loaders_get_the_dense_model_never_random_weights(tmp_path):
    model = trained(llama())
    expected = logits(model)
    poetlm.save_pretrained(model, tmp_path / "poet")
    model.save_pretrained(tmp_path / "raw")  # the model's own save_pretrained (what Trainer checkpoints use)
    for directory in ("poet", "raw"):
        plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / directory, output_loading_info=True)
        assert type(plain) is LlamaForCausalLM and not info["missing_keys"]
        torch.testing.assert_close(logits(plain.eval()), expected, rtol=0, atol=1e-5)
    # poetlm's directory holds exactly a dense LLaMA; the POET state is in its own files.
    assert not AutoModelForCausalLM.from_pretrained(tmp_path / "poet", output_loading_info=True)[1]["unexpected_keys"]
    assert {p.name for p in (tmp_path / "poet").iterdir()} >= {"config.json", "model.safetensors", CONFIG_NAME, STATE_NAME}


def test_a_compiled_model_or_block_saves_under_the_plain_models_names(tmp_path):
    model = trained(llama())
    expected = model.state_dict()
    block = model.model.layers[1]
    model.model.layers[1] = torch.compile(block)  # its keys and names gain "_orig_mod." parts
    for name, saved in (("whole", torch.compile(model)), ("block", model)):
        poetlm.save_pretrained(saved, tmp_path / name)
        plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        loaded = poetlm.from_pretrained(tmp_path / name).state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_parts_poetized_one_at_a_time_draw_as_the_whole_model_with_their_prefix_and_save_their_seeds(tmp_path):
    config = poetlm.POETConfig(block_size=8)
    whole, parts, unnamed = poetlm.poetize(llama(), config), llama(), llama()
    for i, (part, same_part) in enumerate(zip(parts.model.layers, unnamed.model.layers)):
        poetlm.poetize(part, config, prefix=f"model.layers.{i}")
        poetlm.poetize(same_part, config)  # both blocks' layers named "self_attn.q_proj", …
    for name, layer in poetlm.poet_layers(whole):
        assert torch.equal(parts.get_submodule(name).weight0, layer.weight0), name
    q0, q1 = (block.self_attn.q_proj for block in unnamed.model.layers)
    assert torch.equal(q0.weight0, q1.weight0)  # what the prefix is for, and what merges warn of:
    with pytest.warns(UserWarning, match="seeded by 'self_attn.q_proj'.*prefix='model.layers.3'"):
        poetlm.merge(unnamed)
    poetlm.save_pretrained(unnamed, tmp_path)
    loaded = poetlm.from_pretrained(tmp_path)
    with pytest.warns(UserWarning):
        poetlm.merge(loaded)
    with pytest.warns(UserWarning):
        poetlm.merge(unnamed)
    ours, theirs = unnamed.state_dict(), loaded.state_dict()  # the same next draws: seeded as before the save
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merged_save_is_a_plain_model(tmp_path):
    model = trained(gpt2())
    poetlm.save_pretrained(model, tmp_path)
    poetlm.save_pretrained(model, tmp_path, merged=True)  # over the unmerged save: its POET files go
    assert not (tmp_path / CONFIG_NAME).exists() and not (tmp_path / STATE_NAME).exists()
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain), logits(poetlm.export_dense(model)), rtol=0, atol=1e-6)
    with pytest.raises(LoadError, match="plain \\(or merged\\) model directory: load it with transformers' from_pretrained"):
        poetlm.from_pretrained(tmp_path)


def test_bf16_cast_after_wrapping_keeps_the_fp32_master_and_saves_exactly(tmp_path):
    model = trained(llama())
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.weight0.detach().clone()
    model.to(torch.bfloat16)
    assert layer.weight0.dtype == torch.float32 and torch.equal(layer.weight0, w0)  # not rounded through bf16
    assert layer.rotation_in.skew.dtype == torch.float32 and layer.probe_rotated.dtype == torch.float32
    assert layer.weight_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert logits(model).dtype == torch.bfloat16
    assert poetlm.export_dense(model).model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    poetlm.merge(model)
    assert layer.weight0.dtype == torch.float32
    poetlm.save_pretrained(model, tmp_path)
    loaded = poetlm.from_pretrained(tmp_path).eval()
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.weight0.dtype == torch.float32
    # transformers itself loads the rotary inv_freq buffer in fp32, where .to(bf16) had rounded it.
    model.model.rotary_emb.register_buffer("inv_freq", loaded.model.rotary_emb.inv_freq.clone(), persistent=False)
    assert torch.equal(logits(loaded), logits(model))
    model.half()
    assert layer.weight0.dtype == torch.float32 and layer.weight_dtype == torch.float16
    model.double()
    assert layer.weight0.dtype == torch.float64 and layer.weight_dtype == torch.float64


def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(TypeError, match="state_dict"):
        poetlm.save_pretrained(poetlm.poetize(torch.nn.Sequential(torch.nn.Linear(8, 8))), tmp_path)
    with pytest.raises(ValueError, match="no POET layers"):
        poetlm.save_pretrained(llama(), tmp_path)
    with pytest.raises(LoadError, match="not a model directory"):
        poetlm.from_pretrained(tmp_path)
    poetlm.save_pretrained(trained(llama()), tmp_path)
    (tmp_path / STATE_NAME).unlink()
    with pytest.raises(LoadError, match="incomplete"):
        poetlm.from_pretrained(tmp_path)
    info = json.loads((tmp_path / CONFIG_NAME).read_text())
    info["configs"][0]["block_size"] = "eight"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(info))
    with pytest.raises(LoadError, match="corrupt"):
        poetlm.from_pretrained(tmp_path)


def test_a_state_that_does_not_fit_its_layer_is_a_load_error(tmp_path):
    from safetensors.torch import load_file, save_file

    poetlm.save_pretrained(trained(llama()), tmp_path)
    info = json.loads((tmp_path / CONFIG_NAME).read_text())
    changed = json.loads(json.dumps(info))
    changed["configs"][0]["block_size"] = 16  # other block shapes than the saved skew parameters
    (tmp_path / CONFIG_NAME).write_text(json.dumps(changed))
    with pytest.raises(LoadError, match="does not fit"):
        poetlm.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(info))
    state = load_file(tmp_path / STATE_NAME)
    key = next(k for k in state if k.endswith("rotation_in.index"))
    state[key] = torch.zeros_like(state[key])  # loads without a size error, would give wrong outputs
    save_file(state, tmp_path / STATE_NAME)
    with pytest.raises(LoadError, match="a coordinate appears twice"):
        poetlm.from_pretrained(tmp_path)


def test_a_directory_without_config_json_is_a_load_error_not_a_default_model(tmp_path):
    poetlm.save_pretrained(trained(gpt2()), tmp_path)
    (tmp_path / "config.json").unlink()  # transformers would build GPT2Config()'s 124M model (LLaMA: 7B)
    with pytest.raises(LoadError, match="has no config.json, which describes the model's architecture; restore it"):
        poetlm.from_pretrained(tmp_path)


def _resized(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))


def _one_more_layer(directory):  # weights of a smaller model: the missing layer would be drawn at random
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "SafetensorError"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "SafetensorError"),
    (lambda d: (d / "model.safetensors").unlink(), "no file named model.safetensors"),
    (lambda d: (d / "config.json").write_text("{"), "config.json' is not a valid JSON file"),
    (_resized, "ignore_mismatched_sizes"),
    (_one_more_layer, "lack 9 tensors of the model its config.json describes"),
])
def test_a_damaged_dense_model_is_a_load_error(tmp_path, damage, message):
    poetlm.save_pretrained(trained(llama()), tmp_path)
    damage(tmp_path)
    with pytest.raises(LoadError, match=message) as error:
        poetlm.from_pretrained(tmp_path)
    assert "restore them from a copy of the directory, or save the model again" in str(error.value)
    assert "\n" not in str(error.value)


def test_stale_poet_state_beside_newer_dense_weights_is_refused(tmp_path):
    model = trained(llama())
    poetlm.save_pretrained(model, tmp_path)
    opt = torch.optim.AdamW(poetlm.param_groups(model.train(), lr_base=1e-2, lr_poet=1e-2, weight_decay=0.0))
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval().save_pretrained(tmp_path)  # transformers' own save (a Trainer checkpoint): the poetlm files stay
    with pytest.raises(LoadError, match="the poetlm files are stale .* Load the newer dense model with transformers'"):
        poetlm.from_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # what the message offers is the newer model
    torch.testing.assert_close(logits(plain), logits(model), rtol=0, atol=1e-5)


def test_an_edited_poet_config_is_refused(tmp_path):
    poetlm.save_pretrained(trained(llama()), tmp_path)
    info = json.loads((tmp_path / CONFIG_NAME).read_text())
    info["configs"][0]["parameterization"] = "exp"  # valid, but not what the rotations were trained with
    (tmp_path / CONFIG_NAME).write_text(json.dumps(info))
    with pytest.raises(LoadError, match=f"does not compute the dense weight .* or {CONFIG_NAME} was edited"):
        poetlm.from_pretrained(tmp_path)


def test_a_save_over_another_removes_what_no_longer_belongs(tmp_path):
    model = trained(llama())
    poetlm.save_pretrained(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    poetlm.save_pretrained(model, tmp_path, merged=True)  # unsharded: transformers keeps the old index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    poetlm.save_pretrained(model, tmp_path, max_shard_size="20KB")  # sharded: transformers keeps model.safetensors
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits(poetlm.from_pretrained(tmp_path).eval()), logits(model))
