import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import poetlm
from poetlm import POETConfig, POETLinear, primitives
from poetlm import model as model_module


def llama(hidden=32, ffn=48, layers=2, vocab=64, heads=4):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def randomize_rotations(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in poetlm.rotation_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def block_linear_params(model):
    return sum(p.numel() for p in poetlm.rotation_parameters(model))


@pytest.mark.parametrize("variant,kw,ffn,expected", [
    ("bs", {"block_size": 256}, 1280, 9_661_440),
    ("fs", {"fraction": 0.5}, 1376, 8_544_192),
])
def test_trainable_parameter_counts_reproduce_the_paper(variant, kw, ffn, expected):
    with torch.device("meta"):  # counts only: no need to allocate 60M weights
        model = llama(hidden=512, ffn=ffn, layers=8, vocab=32, heads=8)
    model = poetlm.poetize(model, POETConfig(variant=variant, **kw))
    assert len(list(poetlm.poet_layers(model))) == 7 * 8
    assert block_linear_params(model) == expected


def test_poetize_targets_block_linears_and_keeps_everything_else():
    model = llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    poetlm.poetize(model, POETConfig(block_size=8))
    names = [n for n, _ in poetlm.poet_layers(model)]
    assert "lm_head" not in names and len(names) == 14
    assert isinstance(model.lm_head, nn.Linear)
    for name, param in model.named_parameters():
        if "rotation_" in name:
            assert param.requires_grad and torch.all(param == 0)
        elif name.endswith("weight0"):  # W0: frozen, freshly drawn (normalized Gaussian)
            assert not param.requires_grad
            torch.testing.assert_close(param.norm(dim=1), torch.ones(param.shape[0]))
        else:
            assert torch.equal(param, before[name]) and param.requires_grad
    assert not any(n.endswith("q_proj.weight") for n, _ in model.named_parameters())


def test_target_modules_list_and_regex_and_no_match_error():
    model = poetlm.poetize(llama(), POETConfig(block_size=8, target_modules=["q_proj", "v_proj"]))
    assert sorted({n.split(".")[-1] for n, _ in poetlm.poet_layers(model)}) == ["q_proj", "v_proj"]
    model = poetlm.poetize(llama(), POETConfig(block_size=8, target_modules=r".*mlp\.(up|down)_proj"))
    assert sorted({n.split(".")[-1] for n, _ in poetlm.poet_layers(model)}) == ["down_proj", "up_proj"]
    with pytest.raises(ValueError, match="no layer to wrap"):  # a module, but no linear in it
        poetlm.poetize(llama(), POETConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="no nn.Linear"):
        poetlm.poetize(nn.Sequential(nn.Conv1d(2, 2, 1)), POETConfig())
    with pytest.raises(ValueError, match="must match a layer's whole name, e.g. '.\\*\\(q_proj\\|v_proj\\)'"):
        poetlm.poetize(llama(), POETConfig(target_modules="q_proj|v_proj"))  # an alternation, not the whole names
    with pytest.raises(ValueError, match="entry 'lin' matches no module of the model: use a module's name or the end of one, e.g. '0'$"):
        poetlm.poetize(nn.Sequential(nn.Linear(8, 8)), POETConfig(target_modules=["lin"]))  # the example named once


@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_keep_init_wrapped_model_equals_original_and_export_round_trips(variant):
    original = llama()
    ids = torch.randint(0, 64, (2, 10))
    reference = original(ids).logits
    model = poetlm.poetize(copy.deepcopy(original), POETConfig(variant=variant, block_size=8, init="keep"))
    torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-6)
    randomize_rotations(model)
    poet_logits = model(ids).logits
    assert (poet_logits - reference).abs().max() > 1e-3
    dense = poetlm.export_dense(model)
    assert not any(isinstance(m, POETLinear) for m in dense.modules())
    torch.testing.assert_close(dense(ids).logits, poet_logits, rtol=1e-5, atol=1e-5)
    # The exported model is a plain transformers model: it loads into a fresh one without poetlm.
    fresh = llama()
    fresh.load_state_dict(dense.state_dict())
    torch.testing.assert_close(fresh(ids).logits, poet_logits, rtol=1e-5, atol=1e-5)


def test_model_merge_preserves_logits():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    randomize_rotations(model)
    ids = torch.randint(0, 64, (2, 10))
    before = model(ids).logits.detach()
    assert poetlm.merge(model) == 14
    after = model(ids).logits.detach()
    assert (after - before).norm() / before.norm() <= 1e-5


def test_a_merge_never_folds_nan_rotations_into_w0():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    randomize_rotations(model)
    weights = {name: layer.weight0.clone() for name, layer in poetlm.poet_layers(model)}
    last = list(poetlm.poet_layers(model))[-1][1]
    with torch.no_grad():
        last.rotation_out.skew[0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"{last.name!r}: its rotation parameters hold NaN or inf.*nothing was merged"):
        poetlm.merge(model)
    for name, layer in poetlm.poet_layers(model):  # not even the layers before it
        assert torch.equal(layer.weight0, weights[name]) and int(layer.merge_count) == 0


@pytest.mark.parametrize("make_opt", [
    lambda groups: torch.optim.AdamW(groups),
    lambda groups: torch.optim.SGD(groups, momentum=0.9),
    lambda groups: torch.optim.Adagrad(groups),
    # Chained's `state` is a merged copy: popping from it reset nothing, and the rotations kept their Adam moments
    lambda groups: poetlm.optim.Chained([torch.optim.AdamW(groups[:1]), torch.optim.SGD(groups[1:], momentum=0.9)]),
])
def test_merge_clears_rotation_optimizer_state_only(make_opt):
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    opt = make_opt(poetlm.param_groups(model, lr_base=1e-3, lr_poet=1e-3, weight_decay=0.01))
    ids = torch.randint(0, 64, (2, 10))
    model(ids, labels=ids).loss.backward()
    opt.step()
    rotations = poetlm.rotation_parameters(model)
    others = [p for p in model.parameters() if all(p is not r for r in rotations)]
    assert all(r in opt.state and opt.state[r] for r in rotations)
    saved = {id(p): copy.deepcopy(opt.state[p]) for p in others}
    poetlm.merge(model, opt)
    assert all(not opt.state.get(r) for r in rotations)
    for p in others:
        for key, value in saved[id(p)].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(value))
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()  # the optimizer starts the rotation parameters afresh without complaint
    assert all(opt.state[r] for r in rotations)


def test_keep_state_rule_keeps_rotation_state():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    opt = torch.optim.AdamW(poetlm.param_groups(model, 1e-3, 1e-3, 0.0))
    ids = torch.randint(0, 64, (2, 10))
    model(ids, labels=ids).loss.backward()
    opt.step()
    poetlm.merge(model, opt, rule=poetlm.KeepState())
    assert all(opt.state[r] for r in poetlm.rotation_parameters(model))


def test_param_groups():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    groups = {g["name"]: g for g in poetlm.param_groups(model, lr_base=1e-2, lr_poet=1e-3, weight_decay=0.1)}
    rotations = {id(p) for p in poetlm.rotation_parameters(model)}
    assert {id(p) for p in groups["poet"]["params"]} == rotations
    assert groups["poet"]["lr"] == 1e-3 and groups["poet"]["weight_decay"] == 0
    assert groups["base"]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups["base"]["params"])
    assert groups["base_no_decay"]["weight_decay"] == 0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("batching", ["cpu", "gpu"])
def test_step_weight_cache_gives_the_same_gradients_as_per_micro_batch_backward(batching, monkeypatch):
    """Layers' maps run in batches: on CPU as many layers as one weight's entries hold, on a GPU all of them here."""
    if batching == "gpu":
        monkeypatch.setattr(primitives, "CHUNK_ENTRIES", {})  # this CPU takes the policy of an unlisted device
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    randomize_rotations(model)
    layers = [layer for _, layer in poetlm.poet_layers(model)]
    chunks = len(model_module._layer_chunks(layers))
    assert chunks > 1 if batching == "cpu" else chunks == 1
    batches = [torch.randint(0, 64, (2, 10)) for _ in range(3)]

    def grads(cached):
        model.zero_grad()
        if cached:
            with poetlm.step_weight_cache(model):
                for ids in batches:
                    model(ids, labels=ids).loss.backward()
        else:
            for ids in batches:
                model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(layer.step_weight is None for _, layer in poetlm.poet_layers(model))


def test_step_weight_cache_back_propagates_in_fp32_when_left_inside_autocast():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    randomize_rotations(model)
    ids = torch.randint(0, 64, (2, 10))

    def rotation_grads(exit_inside_autocast):
        model.zero_grad()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        if exit_inside_autocast:  # the natural nesting
            with autocast, poetlm.step_weight_cache(model):
                model(ids, labels=ids).loss.backward()
        else:
            with poetlm.step_weight_cache(model):
                with autocast:
                    loss = model(ids, labels=ids).loss
                loss.backward()
        return [p.grad.clone() for p in poetlm.rotation_parameters(model)]

    for inside, outside in zip(rotation_grads(True), rotation_grads(False), strict=True):
        torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-7)  # bf16 products were off by 3e-3–3e-2


def test_step_weight_cache_refuses_to_nest():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    ids = torch.randint(0, 64, (2, 10))
    with poetlm.step_weight_cache(model):
        model(ids, labels=ids).loss.backward()
        with pytest.raises(RuntimeError, match="already active"):
            with poetlm.step_weight_cache(model):
                pass
    assert all(p.grad is not None for p in poetlm.rotation_parameters(model))  # the outer block still delivered


def test_an_optimizer_step_inside_step_weight_cache_is_refused_before_anything_changes():
    model = poetlm.poetize(llama(), POETConfig(block_size=8))
    ids = torch.randint(0, 64, (2, 10))
    optimizer = torch.optim.SGD(poetlm.param_groups(model, 1e-2, 1e-1, 0.0))
    other = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))])  # holds none of the model's rotations
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) inside step_weight_cache.*after the `with` block"):
        with poetlm.step_weight_cache(model):
            model(ids, labels=ids).loss.backward()
            other.step()
            optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    optimizer.zero_grad()
    with poetlm.step_weight_cache(model):
        model(ids, labels=ids).loss.backward()
    optimizer.step()  # the documented order; and the refusal ended with its block
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.rotation_in.skew, before["model.layers.0.self_attn.q_proj.rotation_in.skew"])


def test_diagnostics_under_autocast_are_the_fp32_ones():
    model = poetlm.poetize(llama(), POETConfig(block_size=8, parameterization="cayley"))
    randomize_rotations(model, scale=0.1)
    plain = poetlm.model_diagnostics(model, spectrum=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = poetlm.model_diagnostics(model, spectrum=True)
    assert under_autocast == pytest.approx(plain, rel=1e-6, abs=1e-9)  # orth_err read 2e-3 for an exact map


def test_diagnostics():
    model = poetlm.poetize(llama(), POETConfig(block_size=8, parameterization="cayley"))
    start = poetlm.model_diagnostics(model, spectrum=True)
    assert start["orth_err"] == 0 and start["q_norm"] == 0 and start["probe_cos"] == pytest.approx(1.0)
    assert start["spectrum_drift"] == 0
    randomize_rotations(model, scale=0.1)
    moved = poetlm.model_diagnostics(model, spectrum=True)
    assert moved["orth_err"] < 1e-6  # exact Cayley
    assert moved["probe_cos"] < 1 and moved["q_norm"] > 0.1
    assert moved["spectrum_drift"] < 1e-5
    cnp = poetlm.poetize(llama(), POETConfig(block_size=8, neumann_terms=1))
    randomize_rotations(cnp, scale=0.1)
    assert poetlm.model_diagnostics(cnp)["orth_err"] > 1e-4  # truncation shows up
    # The probe follows the accumulated rotation across merges, not only the current one.
    poetlm.merge(model)
    merged = poetlm.model_diagnostics(model)
    assert merged["probe_cos"] == pytest.approx(moved["probe_cos"], abs=1e-5)


def test_poetize_a_bare_linear_returns_the_poet_layer():
    layer = poetlm.poetize(nn.Linear(8, 6), POETConfig(block_size=4))
    assert isinstance(layer, POETLinear) and set(dict(layer.named_children())) == {"rotation_in", "rotation_out"}
    dense = poetlm.export_dense(layer)
    assert type(dense) is nn.Linear
    x = torch.randn(3, 8)
    torch.testing.assert_close(dense(x), layer(x))


def test_a_module_used_twice_stays_one_shared_poet_layer():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    poetlm.poetize(model, POETConfig(block_size=4))
    assert isinstance(model[0], POETLinear) and model[0] is model[2]
    assert len(list(poetlm.poet_layers(model))) == 1


def test_distinct_layers_sharing_one_weight_are_refused_and_rotated_once_by_the_optimizer():
    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        net[2].weight = net[0].weight
        return net

    with pytest.raises(ValueError, match="share one weight.*exclude_modules=\\['2'\\]"):
        poetlm.poetize(model(), POETConfig(block_size=4))
    net = model()
    named = poetlm.rotated_weights(net, POETConfig(block_size=4))
    assert [name for name, _ in named] == ["0.weight"]
    before = torch.linalg.svdvals(net[0].weight.detach())
    opt = poetlm.POET(named, lr=0.05, poet=POETConfig(block_size=4))
    net(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    assert opt.state[net[0].weight]["step"] == 1
    torch.testing.assert_close(torch.linalg.svdvals(net[0].weight.detach()), before)


def test_a_layer_tied_to_a_module_left_unwrapped_is_refused_not_untied():
    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.dec.weight = self.enc.weight

    model = EncoderDecoder()
    with pytest.raises(ValueError, match="layer 'enc' shares its weight with 'dec.weight' \\(tied\\).*exclude_modules=\\['enc'\\]"):
        poetlm.poetize(model, POETConfig(block_size=4, exclude_modules=["dec"]))
    assert type(model.enc) is nn.Linear and model.dec.weight is model.enc.weight  # nothing was wrapped
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="layer 'lm_head' shares its weight with 'model.embed_tokens.weight'.*tie_word_embeddings=False"):
        poetlm.poetize(tied, POETConfig(block_size=8, target_modules=["lm_head", "q_proj"]))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_poetize_settings_errors_name_the_fix():
    with pytest.raises(TypeError, match="POETConfig\\(\\*\\*settings\\)"):
        poetlm.poetize(llama(), {"block_size": 8})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        POETConfig(target_modules="(")
    with pytest.raises(ValueError, match="exclude_modules=\\['0'\\]"):
        poetlm.poetize(nn.Sequential(nn.Linear(8, 8)), POETConfig(block_size=4, exclude_modules=["0"]))


def test_a_poet_layers_weight_cannot_be_set_and_a_dense_state_dict_is_refused_even_unstrict():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    model = poetlm.poetize(copy.deepcopy(dense), POETConfig(block_size=4))
    with pytest.raises(AttributeError, match="weight is computed from W0 and the rotations and cannot be set"):
        model[0].weight = nn.Parameter(torch.zeros(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="0.weight: a dense weight without POET's W0.*init='keep'"):
        model.load_state_dict(dense.state_dict(), strict=False)
    saved = model.state_dict()  # a POET layer's own state dict (which holds the dense weight too) loads as always
    assert "0.weight" in saved and not model.load_state_dict(saved).unexpected_keys
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0, equal_nan=True)  # the refused load changed nothing


def test_exclude_modules_covers_what_an_excluded_module_contains():
    model = poetlm.poetize(llama(), POETConfig(block_size=8, exclude_modules=["mlp"]))
    wrapped = [name for name, _ in poetlm.poet_layers(model)]
    assert wrapped and not any(".mlp." in name for name in wrapped) and all("self_attn" in name for name in wrapped)


def test_target_modules_covers_what_a_parent_contains_and_refuses_typos():
    model = poetlm.poetize(llama(), POETConfig(block_size=8, target_modules=["q_proj", "mlp"]))
    expected = sorted(name for name, m in llama().named_modules()
                      if isinstance(m, nn.Linear) and (name.endswith(".q_proj") or ".mlp." in name))
    assert sorted(name for name, _ in poetlm.poet_layers(model)) == expected and len(expected) == 2 * 4
    whole = poetlm.poetize(llama(), POETConfig(block_size=8, target_modules=["model"]))  # the head is not inside it
    assert len(list(poetlm.poet_layers(whole))) == 2 * 7 and isinstance(whole.lm_head, nn.Linear)
    base = llama()
    with pytest.raises(ValueError, match=r"^target_modules entry 'v_porj' matches no module of the model: did you mean 'v_proj'"):
        poetlm.poetize(base, POETConfig(block_size=8, target_modules=["q_proj", "v_porj", "mlp"]))
    assert not list(poetlm.poet_layers(base))  # refused before anything was wrapped
    with pytest.raises(ValueError, match="exclude_modules entry 'mpl' matches no module of the model: did you mean 'mlp'"):
        poetlm.poetize(base, POETConfig(block_size=8, exclude_modules=["mpl"]))


def test_a_merge_of_rotations_past_the_series_radius_warns_that_it_changed_the_spectrum():
    """CNP is orthogonal only while ‖Q‖₂ < 1; a merge past it bent every singular value, without a word."""
    for parameterization, warns in (("cayley_neumann", True), ("cayley", False)):
        model = poetlm.poetize(llama(), POETConfig(block_size=8, parameterization=parameterization))
        with torch.no_grad():
            for p in poetlm.rotation_parameters(model):
                p.normal_(std=1.0)  # ‖Q‖₂ of a few
        layer = next(layer for _, layer in poetlm.poet_layers(model))
        before = torch.linalg.svdvals(layer.weight0.detach())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            poetlm.merge(model)
        said = [str(w.message) for w in caught if issubclass(w.category, poetlm.POETWarning)]
        moved = float((torch.linalg.svdvals(layer.weight0.detach()) - before).abs().max() / before.max())
        assert bool(said) == warns and (moved > 1e-2) == warns, (parameterization, moved, said)
        assert not warns or "the Cayley–Neumann series was used past its radius" in said[0]
