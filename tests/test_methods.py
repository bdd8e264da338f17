import pytest
import torch

from poetlm.train.config import resolve_config
from poetlm.train.methods import build_optimizers, clip_threshold, lr_factor, merge_due, prepare_model
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


def test_clip_is_tightened_after_a_merge_and_ramps_back():
    config = resolve_config("tiny", ["optim.grad_clip=0.5", "optim.merge_clip_steps=10"])
    assert clip_threshold(37, None, config) == 0.5
    assert clip_threshold(100, 100, config) == pytest.approx(0.05)
    assert clip_threshold(105, 100, config) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))
    assert clip_threshold(110, 100, config) == 0.5


def test_merges_happen_every_merge_every_steps_for_poet_only():
    poet = resolve_config("tiny", ["steps=500", "poet.merge_every=200"])
    assert [s for s in range(1, 501) if merge_due(s, poet)] == [200, 400]
    assert not any(merge_due(s, resolve_config("tiny", ["method='adamw'", "steps=500"])) for s in range(1, 501))


def test_optimizers_per_method():
    def build(method):
        config = resolve_config("tiny", [f"method={method!r}", *SMALL])
        model = prepare_model(build_llama(config.model, 300, 32), config)
        return model, build_optimizers(model, config)

    model, (adamw,) = build("poet")
    names = {g["name"]: g for g in adamw.param_groups}
    assert names["poet"]["lr"] == 4e-3 and names["poet"]["weight_decay"] == 0
    model, (muon, rest) = build("muon")
    assert isinstance(muon, torch.optim.Muon) and isinstance(rest, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    rest_ids = {id(p) for g in rest.param_groups for p in g["params"]}
    assert not muon_ids & rest_ids
    assert muon_ids | rest_ids == {id(p) for p in model.parameters()}
    assert id(model.model.embed_tokens.weight) in rest_ids and id(model.lm_head.weight) in rest_ids
    assert id(model.model.layers[0].mlp.up_proj.weight) in muon_ids


def test_split_seed_follows_the_run_seed_unless_pinned():
    assert resolve_config("tiny", ["seed=5"]).data.resolved_split_seed(5) == 5
    pinned = resolve_config("tiny", ["seed=5", "data.split_seed=0"])
    assert pinned.data.resolved_split_seed(pinned.seed) == 0
