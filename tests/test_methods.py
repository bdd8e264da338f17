import math

import pytest
import torch

from poetlm.train.config import resolve_config
from poetlm.optim import POET
from poetlm.train.methods import lr_factor, make_method
from poetlm.train.models import build_llama

SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2", "poet.block_size=8"]


def test_cosine_schedule_with_warmup_reaches_the_minimum_ratio():
    config = resolve_config("tiny", ["steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.01"])
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(110, config) == pytest.approx(0.01)
    factors = [lr_factor(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_the_last_step_runs_one_step_short_of_min_lr_ratio():
    # As documented (OptimConfig.min_lr_ratio, lr_factor) and as transformers' cosine schedule: the floor
    # is where the cosine would be one step after the last; published runs depend on it staying so.
    config = resolve_config("tiny", ["steps=20", "optim.warmup_steps=10", "optim.min_lr_ratio=0.01"])
    last = lr_factor(19, config)
    assert last == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # 0.0342
    assert last > 0.01 and lr_factor(20, config) == pytest.approx(0.01)


def test_clip_is_tightened_after_a_merge_and_ramps_back():
    method = make_method(resolve_config("tiny", ["method='poet-paper'", "optim.grad_clip=0.5", "optim.merge_clip_steps=10"]))
    assert method.clip_threshold(37, None) == 0.5
    assert method.clip_threshold(100, 100) == pytest.approx(0.05)
    assert method.clip_threshold(105, 100) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))
    assert method.clip_threshold(110, 100) == 0.5
    assert make_method(resolve_config("tiny", ["optim.grad_clip=0.5"])).clip_threshold(100, 100) == 0.5


def build(method, *overrides):
    config = resolve_config("tiny", [f"method={method!r}", *SMALL, *overrides])
    method = make_method(config)
    model = method.prepare(build_llama(config.model, 300, 32))
    return method, model, method.optimizers(model)


def test_paper_merges_happen_every_merge_every_steps_only():
    method, model, optimizers = build("poet-paper", "steps=500", "poet.merge_every=200")
    assert [s for s in range(1, 501) if method.after_step(s, model, optimizers)] == [200, 400]
    for name in ("poet", "adamw", "muon"):
        method, model, optimizers = build(name, "steps=500")
        assert not any(method.after_step(s, model, optimizers) for s in range(1, 501))


def test_poet_paper_is_the_papers_recipe_unless_k_is_given():
    assert resolve_config("tiny", ["method='poet-paper'"]).poet.neumann_terms == 3
    assert resolve_config("tiny", ["method='poet-paper'", "poet.neumann_terms=4"]).poet.neumann_terms == 4
    assert resolve_config("tiny").poet.neumann_terms == 4


def test_optimizers_per_method():
    _, model, (adamw,) = build("poet-paper")
    names = {g["name"]: g for g in adamw.param_groups}
    assert names["poet"]["lr"] == 4e-3 and names["poet"]["weight_decay"] == 0  # the tiny preset's [methods.poet-paper]
    _, model, (rotations, rest) = build("poet", "optim.lr_poet=0.02")
    assert isinstance(rotations, POET) and rotations.param_groups[0]["lr"] == 0.02
    rotated = {id(p) for p in rotations.param_groups[0]["params"]}
    assert rotated == {id(m.weight) for n, m in model.named_modules() if n.endswith(("_proj",))}
    assert not rotated & {id(p) for g in rest.param_groups for p in g["params"]}
    _, model, (adamw,) = build("adamw", "optim.lr_hidden=1e-3")
    lrs = {g["name"]: g["lr"] for g in adamw.param_groups}
    assert lrs["hidden"] == 1e-3 and lrs["base"] == resolve_config("tiny").optim.lr
    assert id(model.lm_head.weight) in {id(p) for g in adamw.param_groups if g["name"] == "base" for p in g["params"]}
    _, model, (muon, rest) = build("muon")
    assert isinstance(muon, torch.optim.Muon) and isinstance(rest, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    rest_ids = {id(p) for g in rest.param_groups for p in g["params"]}
    assert not muon_ids & rest_ids
    assert muon_ids | rest_ids == {id(p) for p in model.parameters()}
    assert id(model.model.embed_tokens.weight) in rest_ids and id(model.lm_head.weight) in rest_ids
    assert id(model.model.layers[0].mlp.up_proj.weight) in muon_ids


def test_lora_targets_its_own_setting_not_poets():
    def adapted(*overrides):
        config = resolve_config("finetune", ["finetune.base_model='unused'", "method='lora'", *SMALL, *overrides])
        model = make_method(config).prepare(build_llama(config.model, 300, 32))
        return {name.split(".lora_A")[0].rpartition(".")[2] for name, _ in model.named_parameters() if ".lora_A" in name}

    seven = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted() == seven
    assert adapted("poet.target_modules=['q_proj']") == seven  # POET's setting is POET's alone
    assert adapted("finetune.lora_targets=['q_proj', 'v_proj']") == {"q_proj", "v_proj"}
    assert adapted("finetune.lora_targets='.*mlp\\.(up|down)_proj'") == {"up_proj", "down_proj"}


def test_split_seed_follows_the_run_seed_unless_pinned():
    assert resolve_config("tiny", ["seed=5"]).data.resolved_split_seed(5) == 5
    pinned = resolve_config("tiny", ["seed=5", "data.split_seed=0"])
    assert pinned.data.resolved_split_seed(pinned.seed) == 0


def test_fold_form_draws_the_layer_forms_w0_and_coordinates():
    """Same seed, same names: the optimizer rotates the W0 a POETLinear would hold, on the same coordinates."""
    _, dense, (rotations, _) = build("poet")
    _, layered, _ = build("poet-paper", "poet.neumann_terms=4", f"poet.init_scale={resolve_config('tiny').poet.init_scale}")
    layer = layered.model.layers[1].mlp.down_proj
    weight = dense.model.layers[1].mlp.down_proj.weight
    assert torch.equal(weight, layer.weight0)
    weight.grad = torch.zeros_like(weight)
    rotations.step()
    assert torch.equal(rotations.state[weight]["out"]["index"], layer.rotation_out.index)
    assert torch.equal(rotations.state[weight]["in"]["index"], layer.rotation_in.index)
