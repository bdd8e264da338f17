import dataclasses

import pytest
import torch
from torch import nn

from poetlm import POETConfig, POETLinear
from poetlm.primitives import permute
from reference import dense_rotation, dense_weight

SHAPES = [(12, 20), (10, 7), (16, 16)]  # (in, out): b=4 divides some, not others with b=6


def make_layer(variant, in_f, out_f, dtype=torch.float64, bias=True, **kw):
    config = POETConfig(variant=variant, block_size=kw.pop("block_size", 6), fraction=kw.pop("fraction", 0.5), **kw)
    layer = POETLinear(in_f, out_f, bias=bias, config=config, name="blocks.0.proj", dtype=dtype)
    g = torch.Generator().manual_seed(in_f * 100 + out_f)
    with torch.no_grad():
        for p in layer.rotation_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.15)
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g, dtype=dtype))
    return layer


@pytest.mark.parametrize("variant", ["bs", "fs"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["weight", "input"])
@pytest.mark.parametrize("parameterization", ["cayley_neumann", "cayley", "exp"])
def test_forward_matches_dense_reference(variant, shape, mode, parameterization):
    layer = make_layer(variant, *shape, forward_mode=mode, parameterization=parameterization, neumann_terms=2)
    x = torch.randn(5, 3, shape[0], dtype=torch.float64)
    reference = x @ dense_weight(layer, parameterization, 2).T + layer.bias.detach()
    torch.testing.assert_close(layer(x), reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.effective_weight(), dense_weight(layer, parameterization, 2), rtol=1e-10, atol=1e-10)


def test_block_stochastic_rotates_every_coordinate_and_fully_stochastic_only_a_subset():
    bs = make_layer("bs", 10, 7, block_size=4)
    assert sorted(bs.rotation_in.index.tolist()) == list(range(10))
    assert [p.numel() for p in bs.rotation_parameters()] == [6 + 6 + 1, 6 + 3]
    fs = make_layer("fs", 10, 7, fraction=0.5)
    r = dense_rotation(fs.rotation_in, "fs")
    untouched = sorted(set(range(10)) - set(fs.rotation_in.index.tolist()))
    assert len(untouched) == 5
    torch.testing.assert_close(r[untouched][:, untouched], torch.eye(5, dtype=torch.float64))
    assert [p.numel() for p in fs.rotation_parameters()] == [10, 3]  # b_in=5, b_out=⌊3.5⌋=3


@pytest.mark.parametrize("variant", ["bs", "fs"])
@pytest.mark.parametrize("mode", ["weight", "input"])
def test_gradcheck_fp64(variant, mode):
    layer = make_layer(variant, 9, 7, block_size=4, forward_mode=mode)
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    params = [layer.rotation_in.skew, layer.rotation_out.skew]
    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(lambda x, a, b: _functional_forward(layer, x, a, b), inputs)


def _functional_forward(layer, x, a, b):
    return torch.func.functional_call(layer, {"rotation_in.skew": a, "rotation_out.skew": b}, (x,))


@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_identity_at_start_and_keep_init_reproduces_the_linear(variant):
    linear = nn.Linear(13, 9)
    layer = POETLinear.from_linear(linear, POETConfig(variant=variant, block_size=4, init="keep"), "l")
    x = torch.randn(4, 13)
    for mode in ("weight", "input"):
        layer.config = dataclasses.replace(layer.config, forward_mode=mode)
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-6)
    assert torch.equal(layer.effective_weight(), linear.weight.detach())
    assert layer.bias is linear.bias


@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_merge_preserves_outputs_and_resets(variant):
    layer = make_layer(variant, 24, 18, dtype=torch.float32, block_size=5)
    x = torch.randn(6, 24)
    before = layer(x).detach()
    old_index = layer.rotation_in.index.clone()
    layer.merge()
    after = layer(x).detach()
    assert ((after - before).norm() / before.norm()) <= 1e-5
    assert all(torch.all(p == 0) for p in layer.rotation_parameters())
    assert int(layer.merge_count) == 1
    assert not torch.equal(layer.rotation_in.index, old_index)


def test_fifty_cayley_merges_keep_the_singular_values():
    layer = POETLinear(40, 24, config=POETConfig(block_size=8, parameterization="cayley"), name="m", dtype=torch.float32)
    initial = torch.linalg.svdvals(layer.effective_weight().double())
    start_weight = layer.weight0.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        with torch.no_grad():
            for p in layer.rotation_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        layer.merge()
    final = torch.linalg.svdvals(layer.effective_weight().double())
    assert ((final - initial).abs() / initial).max() <= 1e-5
    # ...while the weight itself moved far: the spectrum survived real rotations.
    assert (layer.weight0 - start_weight).norm() > 0.5 * start_weight.norm()


def test_permutations_are_a_pure_function_of_seed_name_and_merge_count():
    a = POETLinear(32, 16, config=POETConfig(block_size=8, seed=3), name="layers.1.q")
    b = POETLinear(32, 16, config=POETConfig(block_size=8, seed=3), name="layers.1.q")
    c = POETLinear(32, 16, config=POETConfig(block_size=8, seed=3), name="layers.2.q")
    assert torch.equal(a.rotation_in.index, b.rotation_in.index)
    assert not torch.equal(a.rotation_in.index, c.rotation_in.index)
    a.merge(), b.merge()
    assert torch.equal(a.rotation_out.index, b.rotation_out.index)
    assert torch.equal(a.weight0, b.weight0)


def test_initializations():
    def w0(init):
        return POETLinear(300, 200, config=POETConfig(init=init), name="x").weight0

    torch.testing.assert_close(w0("normalized_gaussian").norm(dim=1), torch.ones(200))
    torch.testing.assert_close(torch.linalg.svdvals(w0("uniform_spectrum")), torch.ones(200), atol=1e-5, rtol=0)
    assert abs(w0("standard").std() - 0.02) < 1e-3
    assert abs(w0("xavier").std() - (2 / 500) ** 0.5) < 2e-3


def test_weight_dtype_and_fp32_master():
    layer = POETLinear(16, 8, config=POETConfig(block_size=4), name="x", dtype=torch.bfloat16)
    assert layer.weight0.dtype == torch.float32 and layer.rotation_in.skew.dtype == torch.float32
    out = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_auto_mode_picks_the_cheaper_path():
    layer = POETLinear(512, 1280, config=POETConfig(block_size=64), name="x")
    assert layer.uses_input_centric(1)
    assert not layer.uses_input_centric(4096)
    layer.config = dataclasses.replace(layer.config, forward_mode="input")
    assert layer.uses_input_centric(4096)


@pytest.mark.parametrize("dim", [0, -1])
def test_permutation_gather_matches_index_select_forward_and_backward(dim):
    index = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    x = torch.randn(11, 5, 11, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(11, 5, 11, dtype=torch.float64)
    ours = permute(x, index, torch.argsort(index), dim)
    reference = x.index_select(dim, index)
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(reference, x, upstream)[0],
                               atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda t: permute(t, index, torch.argsort(index), dim), (x,))


@pytest.mark.parametrize("dim", [0, 1])
def test_permutation_of_a_transposed_matrix_keeps_its_layout(dim):
    # The weight path builds its weight as a transpose and gets its gradient as one: both are gathered in
    # their own layout (fast), and must still be the plain gather.
    index = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    x = torch.randn(7, 7, dtype=torch.float64).T.requires_grad_()
    upstream = torch.randn(7, 7, dtype=torch.float64).T
    ours = permute(x, index, torch.argsort(index), dim)
    reference = x.index_select(dim, index)
    assert ours.T.is_contiguous()
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(reference, x, upstream)[0],
                               atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_input_path_takes_the_dtype_of_an_autocast_block_product(variant, monkeypatch):
    # CUDA autocast runs the block products in bf16 while x stays fp32 (CPU autocast does not, so the
    # product's downcast is imitated): the fs side once failed there, mixing dtypes in index_copy.
    layer = make_layer(variant, 12, 20, dtype=torch.float32, forward_mode="input")
    x = torch.randn(3, 12)
    reference = layer(x)
    for side in (layer.rotation_in, layer.rotation_out):
        product = side._rotate_gathered
        monkeypatch.setattr(side, "_rotate_gathered", lambda *args, product=product: product(*args).bfloat16())
    out = layer(x)
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_input_path_under_autocast_rotates_in_fp32_and_multiplies_in_bf16(variant):
    layer = make_layer(variant, 12, 20, dtype=torch.float32, forward_mode="input")
    x = torch.randn(3, 12)
    blocks_in, blocks_out = layer.rotation_blocks()
    rotated = layer.rotation_in.rotate(x, blocks_in, transpose=True)
    product = nn.functional.linear(rotated.bfloat16(), layer.weight0.bfloat16())
    expected = layer.rotation_out.rotate(product.float(), blocks_out, transpose=True).bfloat16() + layer.bias.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("fraction", "dim", "size"), [(0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29), (0.5, 7, 3),
                                                       (1 / 3, 30, 10), (2 / 3, 3, 2), (1 / 7, 14, 2), (1 / 3, 768, 256)])
def test_fully_stochastic_size_is_the_floor_of_the_decimal_fraction(fraction, dim, size):
    layer = POETLinear(dim, 4, config=POETConfig(variant="fs", fraction=fraction), name="f")
    assert layer.rotation_in.index.numel() == size  # 0.29·100 is 28.999… in floating point
    assert layer.rotation_in.skew.numel() == size * (size - 1) // 2


def test_layers_built_without_a_name_differ_and_follow_torch_seed():
    config = POETConfig(block_size=4)
    torch.manual_seed(5)
    q, k = POETLinear(8, 8, config=config), POETLinear(8, 8, config=config)
    assert not torch.equal(q.weight0, k.weight0) and not torch.equal(q.probe, k.probe)
    torch.manual_seed(5)
    again = POETLinear(8, 8, config=config)
    assert torch.equal(again.weight0, q.weight0) and torch.equal(again.rotation_in.index, q.rotation_in.index)


def test_a_layer_of_a_compiled_model_draws_what_the_plain_one_draws():
    config = POETConfig(block_size=4)
    plain, compiled = POETLinear(8, 6, config=config, name="0.mlp"), POETLinear(8, 6, config=config, name="_orig_mod.0.mlp")
    assert torch.equal(plain.weight0, compiled.weight0) and torch.equal(plain.rotation_in.index, compiled.rotation_in.index)


def test_inputs_and_shapes_poet_cannot_take_are_refused():
    layer = POETLinear(8, 4, config=POETConfig(block_size=4), name="l")
    with pytest.raises(TypeError, match="floating-point inputs, got torch.int64"):
        layer(torch.arange(8).repeat(2, 1))
    with pytest.raises(ValueError, match="nothing POET can rotate.*raise fraction"):
        POETLinear(6, 6, config=POETConfig(variant="fs", fraction=0.1), name="small")
    with pytest.raises(ValueError, match="nothing POET can rotate"):
        POETLinear(1, 1, config=POETConfig(block_size=4), name="scalar")
    assert POETLinear(5, 1, config=POETConfig(block_size=4), name="column").rotation_in.skew.numel() > 0


@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_a_state_dict_whose_coordinates_are_corrupt_is_refused(variant):
    layer = POETLinear(8, 12, config=POETConfig(variant=variant, block_size=4), name="l")
    state = layer.state_dict()
    state["rotation_out.index"] = torch.zeros_like(state["rotation_out.index"])
    with pytest.raises(RuntimeError, match="rotation_out.index: a coordinate appears twice"):
        POETLinear(8, 12, config=POETConfig(variant=variant, block_size=4), name="l").load_state_dict(state)
    if variant == "bs":  # a permutation whose stored inverse does not belong to it
        state = layer.state_dict()
        state["rotation_in.index"] = torch.arange(8).flip(0)
        with pytest.raises(RuntimeError, match="inverse is not the inverse permutation"):
            POETLinear(8, 12, config=POETConfig(block_size=4), name="l").load_state_dict(state)
