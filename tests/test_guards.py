"""Mistakes a user can make get a message that names them, not a deep or misleading error."""

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import poetlm
from poetlm import POETConfig
from poetlm.cli import main
from poetlm.train import loop
from poetlm.train.config import ConfigError, resolve_config


def llama():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_poetizing_twice_says_already_poetized():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    with pytest.raises(ValueError, match=r"already poetized \(7 POETLinear layers"):
        poetlm.poetize(model, POETConfig(block_size=8))


def test_merge_refuses_an_optimizer_that_does_not_hold_the_rotations():
    model = llama()
    early = torch.optim.AdamW(model.parameters())  # created before poetize: it never sees the rotations
    model = poetlm.poetize(model, POETConfig(block_size=8))
    before = [layer.weight0.clone() for _, layer in poetlm.poet_layers(model)]
    with pytest.raises(ValueError, match="does not hold 14 of the model's rotation parameters"):
        poetlm.merge(model, early)
    assert all(torch.equal(w, layer.weight0) for w, (_, layer) in zip(before, poetlm.poet_layers(model)))
    poetlm.merge(model, torch.optim.AdamW(poetlm.param_groups(model, lr_base=1e-3, lr_poet=1e-3, weight_decay=0.0)))


@pytest.mark.parametrize("mode", ["weight", "input"])
def test_a_wrong_input_width_names_the_layer(mode):
    model = poetlm.poetize(llama(), POETConfig(block_size=8, forward_mode=mode))
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"POETLinear 'model.layers.0.self_attn.q_proj' .* in_features=32, got shape \(2, 5\)"):
        layer(torch.randn(2, 5))


@pytest.mark.parametrize("override,message", [
    ("model.num_heads=0", "model.num_heads=0 is invalid"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 is invalid"),
])
def test_model_shape_errors_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("tiny", [override])


def test_poet_seed_follows_seed_unless_set_explicitly():
    assert resolve_config("tiny", ["seed=3"]).poet.seed == 3
    assert resolve_config("tiny", ["seed=3", "poet.seed=7"]).poet.seed == 7
    assert resolve_config("tiny", ["poet.seed=7", "seed=3"]).poet.seed == 7


def test_cuda_without_cuda_is_a_config_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "device='cuda' but CUDA is not available here" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--device", "cuda"]) == 2
    assert "use --device cpu or --device auto" in capsys.readouterr().err  # as the command takes it


def test_run_directories_are_claimed_atomically(tmp_path):
    config = resolve_config("tiny", [f"out_dir={str(tmp_path)!r}", "name='sweep'"])
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(loop.claim_run_dir(config))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in claimed) == sorted(["sweep"] + [f"sweep-{n}" for n in range(2, 9)])
    assert all(p.is_dir() for p in claimed)


def test_resume_of_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "step_00000003.pt").write_bytes(b"")
    assert main(["train", "--resume", str(tmp_path / "step_00000003.pt")]) == 2
    assert "is a file: give the run directory" in capsys.readouterr().err


def test_an_explicit_poet_seed_is_honoured():
    from poetlm.train.methods import prepare_model
    from poetlm.train.models import build_model

    config = resolve_config("tiny", ["method='poet-paper'", "seed=3", "poet.seed=7", "model.num_layers=1"])
    model = prepare_model(build_model(config.model, 300, config.data.seq_len), config)
    assert {layer.config.seed for _, layer in poetlm.poet_layers(model)} == {7}
