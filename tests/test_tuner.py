"""The PEFT-shaped API: get_poet_model / POETModel, on its own and inside transformers.Trainer."""

import inspect
import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import poetlm
from poetlm import POETConfig, POETModel, get_poet_model
from poetlm.integrations import POETCallback, trainer_optimizer

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(path)
    return path


def base(path):
    return LlamaForCausalLM.from_pretrained(path).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train(model, steps=5, merge_every=2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % merge_every == 0:
            poetlm.merge(model, optimizer)  # the wrapper records its history itself
    return model.eval()


def test_wrap_freeze_train_save_and_reload_exactly(base_dir, tmp_path, capsys):
    model = get_poet_model(base(base_dir), POETConfig(block_size=8), trainable=["norm"])
    torch.testing.assert_close(logits(model), logits(base(base_dir)), rtol=0, atol=1e-6)  # starts at the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("rotation_" in n or "norm" in n for n in trainable)
    assert all(layer.config.init == "keep" for _, layer in poetlm.poet_layers(model))
    model.print_trainable_parameters()
    rotations = sum(p.numel() for p in poetlm.rotation_parameters(model))
    norms = 5 * 32  # 2 × (input, post-attention) + final norm
    trained, total = model.get_nb_trainable_parameters()
    assert trained == rotations + norms
    assert capsys.readouterr().out.startswith(f"trainable params: {trained:,} || all params: {total:,} || trainable%: ")
    assert model.config.hidden_size == 32  # attributes of the base model

    train(model)
    assert len(model.history) == 2  # merges at steps 2 and 4, recorded without user code
    expected = logits(model)
    model.save_adapter(tmp_path / "adapter")
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["merges"] == 2 and settings["trainable"] == ["norm"] and settings["poet_config"]["block_size"] == 8
    assert settings["base_model_name_or_path"] == str(base_dir)

    loaded = POETModel.from_pretrained(base(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    assert all(int(layer.merge_count) == 2 for _, layer in poetlm.poet_layers(loaded))
    # Training goes on from the reloaded adapter, and its next adapter replays all merges.
    for m in (model, loaded):
        train(m.train(), steps=2)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)
    loaded.save_adapter(tmp_path / "again")
    again = POETModel.from_pretrained(base(base_dir), tmp_path / "again")
    assert len(again.history) == 3
    torch.testing.assert_close(logits(again), logits(loaded), rtol=0, atol=1e-6)


def test_disable_adapter_merge_and_unload(base_dir, tmp_path):
    reference = logits(base(base_dir))
    model = get_poet_model(base(base_dir), POETConfig(block_size=8), trainable=["norm"])
    train(model, steps=1)  # no merge yet: W0 is still the base weight
    adapted = logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)
    train(model, steps=2)
    with pytest.raises(RuntimeError, match="keep_base_weights=True"):
        with model.disable_adapter():
            pass

    kept = get_poet_model(base(base_dir), POETConfig(block_size=8), trainable=["norm"], keep_base_weights=True)
    train(kept, steps=4)
    adapted = logits(kept)
    assert (adapted - reference).abs().max() > 1e-2
    with kept.disable_adapter():
        torch.testing.assert_close(logits(kept), reference, rtol=0, atol=1e-6)  # norms restored too
    torch.testing.assert_close(logits(kept), adapted, rtol=0, atol=0)

    poetlm.save_pretrained(kept, tmp_path / "poet")  # the wrapper saves as the poetized base it holds
    torch.testing.assert_close(logits(poetlm.from_pretrained(tmp_path / "poet").eval()), adapted, rtol=0, atol=0)

    dense = kept.merge_and_unload()
    assert type(dense) is LlamaForCausalLM and isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(logits(dense), adapted, rtol=0, atol=1e-5)
    dense.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(base(tmp_path / "merged")), adapted, rtol=0, atol=1e-5)


def test_trainer_on_a_tied_gpt2_records_merges_and_saves_checkpoints(tmp_path):
    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                          eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(5))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}

    model = get_poet_model(gpt2(), POETConfig(block_size=8, merge_every=2))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[POETCallback()],
                      optimizers=(trainer_optimizer(model, args, lr_poet=1e-2), None))
    assert trainer.label_names == ["labels"]  # found on the wrapper's class: evaluation computes a loss
    trainer.train()  # checkpoints hold the tied embedding once (safetensors refuses shared tensors)
    assert len(model.history) == 2 and (tmp_path / "out" / "checkpoint-4" / "model.safetensors").is_file()
    model.save_adapter(tmp_path / "adapter")
    loaded = POETModel.from_pretrained(gpt2(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), logits(model.eval()), rtol=0, atol=1e-6)
    fresh = get_poet_model(gpt2(), POETConfig(block_size=8, merge_every=2))
    fresh.load_state_dict(model.state_dict())  # strict: the dropped alias comes back, and the merge history
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=1e-6)
    assert len(fresh.history) == 2
    fresh.save_adapter(tmp_path / "adapter-of-the-loaded-state")
    loaded = POETModel.from_pretrained(gpt2(), tmp_path / "adapter-of-the-loaded-state")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)

    # Trainer's resume reloads the model's state dict alone: the merge at step 2 must come back with it.
    resumed = get_poet_model(gpt2(), POETConfig(block_size=8, merge_every=2))
    args.output_dir = str(tmp_path / "resumed")
    trainer = Trainer(model=resumed, args=args, train_dataset=Tokens(), callbacks=[POETCallback()],
                      optimizers=(trainer_optimizer(resumed, args, lr_poet=1e-2), None))
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert len(resumed.history) == 2
    torch.testing.assert_close(logits(resumed.eval()), logits(model), rtol=0, atol=1e-5)


def test_trainable_patterns_are_checked_before_the_model_is_touched(base_dir):
    model = base(base_dir)
    for trainable, message in [(["layers.0.mlp"], "the weight of a layer POET wraps"), (["nrom"], "matches no parameter"),
                               (["("], "not a regular expression")]:
        with pytest.raises(ValueError, match=message):
            get_poet_model(model, POETConfig(block_size=8), trainable=trainable)
    assert not list(poetlm.poet_layers(model))  # refused before poetize changed anything
    one = get_poet_model(model, POETConfig(block_size=8), trainable="norm")  # one pattern, not the letters n, o, r, m
    assert {n for n, p in one.named_parameters() if p.requires_grad and "rotation_" not in n} == {
        n for n, _ in one.named_parameters() if "norm" in n}
    assert not any(layer.weight0.requires_grad for _, layer in poetlm.poet_layers(one))


def test_get_poet_model_checks_its_arguments_first(base_dir, tmp_path):
    wrapped = get_poet_model(base(base_dir), POETConfig(block_size=8))
    for model in (wrapped, wrapped.base_model):  # the wrapper itself, or the poetized base inside it
        with pytest.raises(ValueError, match="already poetized"):
            get_poet_model(model, POETConfig(block_size=8))
    with pytest.raises(TypeError, match=r"^trainable=None is invalid"):
        get_poet_model(base(base_dir), POETConfig(block_size=8), trainable=None)
    with pytest.raises(TypeError, match=r"^POET wraps a model: pass the base model .*not a str"):
        get_poet_model("llama", POETConfig(block_size=8))
    with pytest.raises(TypeError, match=r"^keep_base_weights='yes' is invalid"):
        get_poet_model(base(base_dir), POETConfig(block_size=8), keep_base_weights="yes")

    wrapped.save_adapter(tmp_path / "llama")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4))
    for keep in (False, True):  # the same refusal whether or not the base weights are kept
        with pytest.raises(poetlm.AdapterError, match="made for a different base model: the base has no layer"):
            POETModel.from_pretrained(gpt2, tmp_path / "llama", keep_base_weights=keep)
    with pytest.raises(poetlm.AdapterError, match="already has POET layers"):
        POETModel.from_pretrained(wrapped.base_model, tmp_path / "llama", keep_base_weights=True)


def test_the_wrapper_passes_arguments_to_the_base_unchanged(base_dir):
    reference = base(base_dir)
    model = get_poet_model(base(base_dir), POETConfig(block_size=8))
    positions = (3 * torch.arange(10)).expand(2, 10)  # third positional argument of a Llama: position_ids
    with torch.no_grad():
        out, expected = model(IDS, None, positions), reference(IDS, None, positions)
    assert out.loss is None  # not read as labels
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
    assert (expected.logits - logits(reference)).abs().max() > 1e-3  # the positions do change the logits
    assert list(inspect.signature(model.forward).parameters)[:3] == ["input_ids", "attention_mask", "position_ids"]

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    x = torch.randn(3, 16)
    expected = mlp(x)
    wrapped = get_poet_model(mlp, POETConfig(block_size=8))
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-6)  # any model, any forward signature


def test_a_state_dict_loads_only_into_a_model_that_replays_it_alike(base_dir, tmp_path):
    model = get_poet_model(base(base_dir), POETConfig(block_size=8, seed=0))
    train(model, steps=4)  # two merges: the history replays on the seed's coordinates and the base's weights
    state = model.state_dict()
    other_base = base(base_dir)
    with torch.no_grad():
        other_base.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    for wrapped, message in [(get_poet_model(base(base_dir), POETConfig(block_size=8, seed=1)),
                              r"^the state dict was saved by a POETModel with POETConfig.seed=0, but this one has seed=1"),
                             (get_poet_model(base(base_dir), POETConfig(block_size=8, parameterization="exp")),
                              r"POETConfig.parameterization='cayley_neumann', but this one has parameterization='exp'"),
                             (get_poet_model(other_base, POETConfig(block_size=8)),
                              r"^the state dict was made for a different base model: the weights of 'model.layers.0.self_attn.q_proj'")]:
        with pytest.raises(ValueError, match=message):
            wrapped.load_state_dict(state)
        assert len(wrapped.history) == 0  # refused before anything was loaded

    same = get_poet_model(base(base_dir), POETConfig(block_size=8, seed=0))
    same.load_state_dict(state)
    same.save_adapter(tmp_path / "adapter")
    torch.testing.assert_close(logits(POETModel.from_pretrained(base(base_dir), tmp_path / "adapter")), logits(model),
                               rtol=0, atol=1e-6)
    # A state dict saved before it carried the replay settings (a Trainer checkpoint of an earlier run) still loads.
    older = get_poet_model(base(base_dir), POETConfig(block_size=8, seed=0))
    older.load_state_dict({k: v for k, v in state.items() if k != "poet_replay"})
    torch.testing.assert_close(logits(older), logits(model), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def saved_adapter(base_dir, tmp_path_factory):
    model = train(get_poet_model(base(base_dir), POETConfig(block_size=8), trainable=["norm"]), steps=4)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)  # PEFT's name: the adapter, not a dense model
    assert sorted(path.name for path in directory.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    return directory, logits(model)


def _with_settings(saved, tmp_path, **changes):
    directory = tmp_path / "edited"
    directory.mkdir()
    (directory / "adapter.safetensors").write_bytes((saved / "adapter.safetensors").read_bytes())
    settings = json.loads((saved / "adapter_config.json").read_text())
    settings.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    return directory


@pytest.mark.parametrize("changes,match", [
    ({"trainable": ["proj"]}, r"'proj' matches .*the weight of a layer POET wraps"),
    ({"trainable": ["("]}, r"'\(' is not a regular expression"),
    ({"trainable": ["no_such_parameter"]}, "matches no parameter"),
    ({"format": "other"}, r"format='other', but the adapter beside it .* has format='poetlm-adapter'"),
    ({"merges": 7}, "merges=7, but the adapter beside it"),
    ({"adapter_file": "x.safetensors"}, "adapter_file='x.safetensors'"),
    ({"version": 99}, "version 99; this poetlm reads adapters up to version"),
    ({"poet_config": {**POETConfig(block_size=8, init="keep").to_dict(), "block_size": 16}},
     r"poet_config.block_size=16, but the adapter beside it was trained with block_size=8"),
])
def test_an_edited_adapter_config_is_refused(base_dir, saved_adapter, tmp_path, changes, match):
    """adapter_config.json is read as get_poet_model reads its arguments: a `trainable` that reaches W0 would
    change the spectrum POET keeps, and settings that disagree with the adapter file would mislead."""
    directory = _with_settings(saved_adapter[0], tmp_path, **changes)
    with pytest.raises(poetlm.AdapterError, match=match):
        POETModel.from_pretrained(base(base_dir), directory)


def test_adapter_config_trainable_as_one_pattern_or_not_an_object(base_dir, saved_adapter, tmp_path):
    directory = _with_settings(saved_adapter[0], tmp_path, trainable="norm")  # a string is one pattern, as for get_poet_model
    model = POETModel.from_pretrained(base(base_dir), directory)
    torch.testing.assert_close(logits(model), saved_adapter[1], rtol=0, atol=0)
    assert model.trainable == ["norm"]
    fixed = [name for name, p in model.named_parameters() if p.requires_grad and "weight0" in name]
    assert not fixed and not model.get_input_embeddings().weight.requires_grad
    (directory / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(poetlm.AdapterError, match="holds a JSON list, not the object"):
        POETModel.from_pretrained(base(base_dir), directory)


def test_after_merge_and_unload_the_adapter_is_gone_and_says_so(base_dir, saved_adapter, tmp_path):
    model = POETModel.from_pretrained(base(base_dir), saved_adapter[0])
    dense = model.merge_and_unload()
    torch.testing.assert_close(logits(dense), saved_adapter[1], rtol=0, atol=1e-5)
    for operation in (lambda: model.save_adapter(tmp_path / "again"), lambda: poetlm.merge(model),
                      lambda: model.disable_adapter().__enter__(), model.unload, model.merge_and_unload):
        with pytest.raises(poetlm.AdapterError, match=r"merge_and_unload\(\) has replaced this model's POET layers"):
            operation()
    assert not (tmp_path / "again").exists()


def test_unload_gives_back_the_base_model(base_dir, saved_adapter, tmp_path):
    reference = logits(base(base_dir))
    model = get_poet_model(base(base_dir), POETConfig(block_size=8), trainable=["norm"])
    train(model, steps=1)  # before any merge W0 is the base weight
    assert (logits(model) - reference).abs().max() > 1e-3
    plain = model.unload()
    assert isinstance(plain.model.layers[0].mlp.down_proj, nn.Linear) and not list(poetlm.poet_layers(plain))
    torch.testing.assert_close(logits(plain), reference, rtol=0, atol=1e-6)  # norms restored too
    merged = train(get_poet_model(base(base_dir), POETConfig(block_size=8)), steps=2)
    with pytest.raises(RuntimeError, match=r"unload\(\) after 1 merge\(s\) needs the base weights"):
        merged.unload()
    kept = train(get_poet_model(base(base_dir), POETConfig(block_size=8), keep_base_weights=True), steps=2)
    torch.testing.assert_close(logits(kept.unload()), reference, rtol=0, atol=1e-6)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(poetlm.AdapterError, match="that is a file; an adapter is a directory"):
        get_poet_model(base(base_dir), POETConfig(block_size=8)).save_adapter(tmp_path / "a-file")
