"""Update rules and the fold-every-step optimizer against dense references."""

import copy
import warnings
import io
import math
import pickle

import pytest
import torch
from torch import nn

import poetlm
from poetlm import POETConfig, POETLinear, merge
from poetlm import optim, orthogonal, primitives
from poetlm.optim import POET, side_blocks, skew_gradient
from poetlm.orthogonal import orthogonalize_skew, unpack_skew
from poetlm.primitives import block_layout, draw_index, seeded_generator, transport_blocks
from poetlm.update_rules import RuleConfig, make_rule


def random_skew(*shape, dtype=torch.float64, seed=0):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return a - a.transpose(-1, -2)


def test_exact_orthogonalization_is_the_polar_factor_and_stays_skew():
    a = random_skew(3, 8, 8)
    u, _, vh = torch.linalg.svd(a)
    result = orthogonalize_skew(a, "exact")
    torch.testing.assert_close(result, u @ vh, atol=1e-10, rtol=0)
    torch.testing.assert_close(result, -result.transpose(-1, -2), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(result), torch.ones(3, 8, dtype=torch.float64), atol=1e-10, rtol=0)


def test_exact_orthogonalization_of_an_odd_block_keeps_its_kernel_at_zero():
    sigma = torch.linalg.svdvals(orthogonalize_skew(random_skew(7, 7), "exact"))
    torch.testing.assert_close(sigma, torch.tensor([1.0] * 6 + [0.0], dtype=torch.float64), atol=1e-9, rtol=0)


def test_newton_schulz_is_skew_and_near_the_polar_factor():
    a = random_skew(4, 16, 16, dtype=torch.float32)
    result = orthogonalize_skew(a, "newton_schulz")
    torch.testing.assert_close(result, -result.transpose(-1, -2), atol=1e-5, rtol=0)
    sigma = torch.linalg.svdvals(result)
    assert sigma.min() > 0.6 and sigma.max() < 1.3
    exact = orthogonalize_skew(a, "exact")
    cosine = (result * exact).sum((-1, -2)) / (result.norm(dim=(-1, -2)) * exact.norm(dim=(-1, -2)))
    assert cosine.min() > 0.95


@pytest.mark.parametrize("method", ["exact", "newton_schulz"])
def test_orthogonalization_does_not_depend_on_the_scale_even_at_extreme_ones(method):
    a = random_skew(2, 16, 16, dtype=torch.float32)
    reference = orthogonalize_skew(a, method)
    for scale in (3e18, 1e19, 1e-23):  # fp32: AᵀA and Frobenius norms overflow or underflow without a rescale
        torch.testing.assert_close(orthogonalize_skew(a * scale, method), reference, atol=1e-4, rtol=0)  # fp32 rounding
    assert not orthogonalize_skew(torch.zeros(1, 4, 4), method).any()



@pytest.mark.parametrize("spread", [1.0, 30.0, 1e4])
def test_newton_schulz_starts_below_one_and_reaches_every_plane_a_spectrum_allows(spread):
    """Flat, graded and spiky spectra of wide blocks (b = 256): no plane overshoots (a start above σ = 1
    would blow up), and planes within 100× of the largest all land in [0.6, 1.25] (a Frobenius-normalized
    start needs a fifth step for that)."""
    b, planes = 256, 128
    basis = torch.linalg.qr(torch.randn(3, b, b, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    sigma = torch.logspace(0, -math.log10(spread), planes, dtype=torch.float64)
    canonical = torch.zeros(b, b, dtype=torch.float64)
    canonical[torch.arange(0, b, 2), torch.arange(1, b, 2)] = sigma
    a = (basis @ (canonical - canonical.T) @ basis.transpose(-1, -2)).float()
    result = torch.linalg.svdvals(orthogonalize_skew(a, "newton_schulz").double())
    assert result.max() < 1.25
    reached = result[:, : 2 * int((sigma >= sigma[0] / 100).sum())]
    assert reached.min() > 0.6

def dense_block_embedding(blocks, index, dim):
    """The dim×dim matrix holding each block at its coordinates (loops, from the definition)."""
    block = blocks.shape[-1]
    dense = torch.zeros(dim, dim, dtype=blocks.dtype)
    for p in range(len(index)):
        for q in range(len(index)):
            if p // block == q // block:
                dense[index[p], index[q]] = blocks[p // block, p % block, q % block]
    return dense


def test_a_bf16_direction_is_skew_and_the_fp32_direction_to_bf16_precision():
    grad = random_skew(6, 64, 64, dtype=torch.float32)
    fp32 = make_rule(RuleConfig(direction_dtype="fp32")).direction(grad, {})
    bf16 = make_rule(RuleConfig(direction_dtype="bf16")).direction(grad, {})
    assert bf16.dtype == torch.float32 and torch.equal(bf16, -bf16.transpose(-1, -2))
    cosine = (bf16 * fp32).sum((-1, -2)) / (bf16.norm(dim=(-1, -2)) * fp32.norm(dim=(-1, -2)))
    assert cosine.min() > 0.99 and (bf16 - fp32).abs().max() > 1e-4  # it did run in bf16


def test_the_auto_direction_is_bf16_newton_schulz_where_bf16_products_are_fast(monkeypatch):
    assert RuleConfig().direction_dtype == "fp32"  # the default: "auto" cost quality and gained no speed at tiny
    inputs, targets = regression(out=24, inp=20)
    start = torch.randn(24, 20) / 5
    weights = {}
    monkeypatch.setattr(orthogonal, "BF16_ON_CPU_FROM", 8)  # this weight's blocks of 8 count as large
    for fast in (True, False):
        monkeypatch.setattr(orthogonal, "fast_bf16_products", lambda device, fast=fast: fast)
        for name, rule in (("auto", RuleConfig(direction_dtype="auto")), ("bf16", RuleConfig(orthogonalize="newton_schulz", direction_dtype="bf16")),
                           ("fp32", RuleConfig(orthogonalize="newton_schulz", direction_dtype="fp32"))):
            weight = nn.Parameter(start.clone())
            optimizer = POET([weight], lr=0.02, poet=POETConfig(block_size=8), rule=rule)
            for _ in range(5):
                ((inputs @ weight.T - targets) ** 2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            weights[fast, name] = weight.detach()
    assert torch.equal(weights[True, "auto"], weights[True, "bf16"])
    assert torch.equal(weights[False, "auto"], weights[False, "fp32"])
    assert (weights[True, "auto"] - weights[False, "auto"]).abs().max() > 1e-6  # the two paths differ


@pytest.mark.parametrize("variant, side", [("bs", "out"), ("bs", "in"), ("fs", "out"), ("fs", "in")])
def test_skew_gradient_is_the_autograd_gradient_of_a_dense_rotation(variant, side):
    torch.manual_seed(0)
    weight = torch.randn(10, 7, dtype=torch.float64)
    inputs, targets = torch.randn(32, 7, dtype=torch.float64), torch.randn(32, 10, dtype=torch.float64)
    dim = weight.shape[0] if side == "out" else weight.shape[1]
    block, sizes = block_layout(variant, dim, 4, 0.5)
    index = draw_index(variant, dim, sum(sizes), seeded_generator(1, side))
    # Reference: L((I + 2M)·W) (output side) or L(W·(I + 2M)ᵀ) (input side), M the dense embedding of free blocks.
    free = torch.zeros(len(sizes), block, block, dtype=torch.float64, requires_grad=True)
    m = dense_block_embedding(free, index, dim)
    eye = torch.eye(dim, dtype=torch.float64)
    rotated = (eye + 2 * m) @ weight if side == "out" else weight @ (eye + 2 * m).T
    ((inputs @ rotated.T - targets) ** 2).sum().backward()
    reference = free.grad - free.grad.transpose(-1, -2)  # the gradient along skew directions Q = U − Uᵀ

    w = weight.clone().requires_grad_(True)
    ((inputs @ w.T - targets) ** 2).sum().backward()
    x, h = (side_blocks(t, side, index, block, len(sizes)) for t in (weight, w.grad))
    torch.testing.assert_close(skew_gradient(x, h), reference, atol=1e-9, rtol=1e-9)


def test_transported_momentum_equals_the_dense_one_on_surviving_planes():
    dim, block = 11, 4
    _, sizes = block_layout("bs", dim, block, 1.0)
    old = draw_index("bs", dim, dim, seeded_generator("old"))
    new = draw_index("bs", dim, dim, seeded_generator("new"))
    blocks = random_skew(len(sizes), block, block)
    blocks[-1, sizes[-1]:, :] = 0  # a short last block has zero padding rows and columns
    blocks[-1, :, sizes[-1]:] = 0
    dense = dense_block_embedding(blocks, old, dim)
    old_block = {int(c): p // block for p, c in enumerate(old)}
    moved = transport_blocks(blocks, old, new, dim)
    for k in range(len(sizes)):
        for i in range(block):
            for j in range(block):
                p, q = k * block + i, k * block + j
                if p >= dim or q >= dim:
                    assert moved[k, i, j] == 0
                    continue
                ci, cj = int(new[p]), int(new[q])
                expected = dense[ci, cj] if old_block[ci] == old_block[cj] else 0.0
                assert moved[k, i, j] == expected


def regression(seed=0, out=12, inp=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, inp, generator=g), torch.randn(64, out, generator=g)


def train_layer_form_beside_fold_form(layered, layer, plain, named, config, inputs, targets, transposed=()) -> None:
    """Five steps of the layer form (AdamW on `layer`'s skew parameters, merged every step) and of the fold form
    (lie_adam on `plain`'s `named` weights, redrawn every step): the same recipe, if the two agree."""
    lr, betas, eps = 3e-3, (0.9, 0.99), 1e-8
    adam = torch.optim.AdamW(layer.rotation_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    rule = RuleConfig(name="lie_adam", beta1=betas[0], beta2=betas[1], eps=eps, redraw_every=1, alternate=False)
    # Cayley and CNP are I + 2Q near 0: the layer's step Q = −lr·D turns by 2·lr, so the optimizer's angle is 2·lr.
    poet = POET(named, lr=2 * lr, poet=config, rule=rule, transposed=transposed)
    for _ in range(5):
        for module, optimizer in ((layered, adam), (plain, poet)):
            ((module(inputs) - targets) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        merge(layered, adam)


def test_fold_every_step_equals_the_layer_form_merging_every_step():
    """lie_adam with a redraw (and state reset) every step is the paper's recipe with merge_every=1 (with the
    exact Cayley map: the fold maps lie_adam's unbounded directions by it in place of the truncated series)."""
    config = POETConfig(variant="bs", block_size=4, parameterization="cayley", seed=3)
    inputs, targets = (t.double() for t in regression(out=10, inp=9))
    layer = POETLinear(9, 10, bias=False, config=config, name="lin", dtype=torch.float64)
    linear = nn.Linear(9, 10, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(layer.weight0)
    start = layer.weight0.detach().clone()
    train_layer_form_beside_fold_form(layer, layer, linear, [("lin.weight", linear.weight)], config, inputs, targets)
    assert (linear.weight.detach() - start).norm() > 1e-3
    torch.testing.assert_close(linear.weight.detach(), layer.effective_weight().detach(), atol=1e-10, rtol=1e-10)


def test_fold_every_step_equals_the_layer_form_merging_every_step_for_a_conv1d():
    """The same for transformers' Conv1D, stored (in, out): the optimizer told so by `transposed_names` draws and
    turns its input side on the rows (it turned the input features as if they were the output ones: 0.026 apart)."""
    from transformers.pytorch_utils import Conv1D

    from poetlm import poetize
    from poetlm.model import transposed_names

    config = POETConfig(variant="bs", block_size=4, parameterization="cayley", seed=3)
    inputs, targets = (t.double() for t in regression(out=10, inp=9))
    layered, plain = (nn.Sequential(Conv1D(10, 9).double()) for _ in range(2))
    layered = poetize(layered, config)
    layer, conv = layered[0], plain[0]
    with torch.no_grad():
        conv.weight.copy_(layer.weight)  # the layer's W0 in Conv1D's (in, out) layout
        conv.bias.copy_(layer.bias)
    start = conv.weight.detach().clone()
    named = [("0.weight", conv.weight)]
    assert transposed_names(plain, named) == ["0.weight"]
    train_layer_form_beside_fold_form(layered, layer, plain, named, config, inputs, targets,
                                      transposed=transposed_names(plain, named))
    assert (conv.weight.detach() - start).norm() > 1e-3
    torch.testing.assert_close(conv.weight.detach(), layer.weight.detach(), atol=1e-10, rtol=1e-10)


def test_poet_optimizer_turns_a_gpt2_conv1d_on_its_output_side_first():
    """Alternation turns the output side on even steps: for a Conv1D's (in, out) weight W ← W·Rᵀ, which keeps the
    Gram matrix of its rows, W·Wᵀ, and turns that of its columns."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from poetlm.optim import poet_optimizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    optimizer = poet_optimizer(model, lr_poet=0.05, poet=POETConfig(block_size=4), rule=RuleConfig(alternate=True))
    weights = {name: weight for group in optimizer.optimizers[0].param_groups
               for name, weight in zip(group["param_names"], group["params"])}
    assert set(weights) == {f"transformer.h.0.{name}.weight" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    before = {name: weight.detach().clone() for name, weight in weights.items()}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, weight in weights.items():
        old, new = before[name].double(), weight.detach().double()
        torch.testing.assert_close(new @ new.T, old @ old.T, atol=1e-5, rtol=0, msg=name)
        assert (new.T @ new - old.T @ old).abs().max() > 1e-4, name


def test_poet_optimizer_refuses_to_redraw_weights_poet_trained_and_resumes_them_with_init_keep():
    """The usual resume order (load the model, then build its optimizer) must not silently put back the untrained W0."""
    from poetlm.optim import poet_optimizer

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    inputs, labels = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4

    def train(model, optimizer, steps):
        for _ in range(steps):
            nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            optimizer.zero_grad()

    model = mlp()
    optimizer = poet_optimizer(model, lr_poet=0.05, lr=1e-2, poet=POETConfig(block_size=8))
    train(model, optimizer, 6)
    saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    resumed = mlp()
    resumed.load_state_dict(saved["model"])
    with pytest.raises(ValueError, match="^0.weight has the singular values of the W0 POET would draw for it, rotated: "
                                         "it was trained with POET.*init='keep'"):
        poet_optimizer(resumed, lr_poet=0.05, lr=1e-2, poet=POETConfig(block_size=8))
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved["model"].items())  # nothing was redrawn
    optimizer_again = poet_optimizer(resumed, lr_poet=0.05, lr=1e-2, poet=POETConfig(block_size=8, init="keep"))
    optimizer_again.load_state_dict(saved["optimizer"])
    train(model, optimizer, 3)
    train(resumed, optimizer_again, 3)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in model.state_dict().items())
    poet_optimizer(mlp(), poet=POETConfig(block_size=8))  # a fresh model's weights are redrawn as before


def test_poet_refuses_transposed_names_of_no_parameter():
    weight = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"^POET\(transposed=…\) names 'lin\.weight', which is not the name of a parameter"):
        POET([weight], poet=POETConfig(block_size=4), transposed=["lin.weight"])


@pytest.mark.parametrize("orthogonalize", ["exact", "newton_schulz"])
def test_an_orthogonalized_step_turns_every_plane_by_the_same_angle(orthogonalize):
    inputs, targets = regression(out=8, inp=8)
    # Seeded: a momentum plane far below the block's largest (σ ≲ 0.1·σ_max) is only partly orthogonalized
    # by Newton–Schulz's four steps, which a draw from the suite's running generator could give.
    weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    before = weight.detach().clone()
    lr = 0.05
    rule = RuleConfig(alternate=True, orthogonalize=orthogonalize)
    optimizer = POET([weight], lr=lr, poet=POETConfig(block_size=4), rule=rule)
    ((inputs.double() @ weight.T - targets.double()) ** 2).sum().backward()
    optimizer.step()  # step 0 of alternation: the output side only, W ← R·W
    rotation = weight.detach() @ torch.linalg.inv(before)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    angles = torch.linalg.eigvals(rotation).angle().abs()
    if orthogonalize == "exact":
        torch.testing.assert_close(angles, torch.full((8,), 2 * math.atan(lr / 2), dtype=torch.float64),
                                   atol=1e-8, rtol=0)
    else:  # Muon's quintic leaves every singular value of the direction in ≈[0.7, 1.2]
        assert torch.all(angles > 2 * math.atan(0.65 * lr / 2)) and torch.all(angles < 2 * math.atan(1.25 * lr / 2))


@pytest.mark.parametrize("block", [4, 5])
def test_exact_directions_fold_the_same_rotation_through_the_closed_form_map(block, monkeypatch):
    """The optimizer maps exact directions by `isometry_increment`; the general map must give the same steps."""
    inputs, targets = (t.double() for t in regression(out=10, inp=9))
    start = torch.randn(10, 9, dtype=torch.float64)
    weights = []
    for closed_form in (True, False):
        weight = nn.Parameter(start.clone())
        optimizer = POET([weight], lr=0.05, poet=POETConfig(block_size=block), rule=RuleConfig(orthogonalize="exact"))
        if not closed_form:
            monkeypatch.setattr(optimizer.rule, "isometric", lambda direction: False)
        for _ in range(6):
            ((inputs @ weight.T - targets) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append(weight.detach())
    assert (weights[0] - start).norm() > 1e-2
    torch.testing.assert_close(weights[0], weights[1], atol=1e-13, rtol=0)


@pytest.mark.parametrize("rule", [RuleConfig(), RuleConfig(name="lie_adam"), RuleConfig(orthogonalize="newton_schulz", alternate=False),
                                  RuleConfig(direction_dtype="fp32"), RuleConfig(direction_dtype="bf16"),
                                  RuleConfig(orthogonalize="exact")])
@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_many_steps_keep_the_spectrum_while_the_weight_moves(rule, variant):
    inputs, targets = regression(out=24, inp=20)
    weight = nn.Parameter(torch.randn(24, 20) / 5)
    start = weight.detach().clone()
    optimizer = POET([weight], lr=0.02, poet=POETConfig(variant=variant, block_size=8), rule=rule)
    for _ in range(200):
        ((inputs @ weight.T - targets) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (weight.detach() - start).norm() / start.norm() > 0.1
    assert optimizer.spectrum_drift() < 1e-5
    torch.testing.assert_close(torch.linalg.svdvals(weight.detach()), torch.linalg.svdvals(start), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [32, 64])
def test_exact_fp32_directions_keep_the_spectrum_where_the_momentum_has_a_long_tail(block):
    """Nearly rank-6 inputs give skew momenta whose small planes sit near the orthogonalization's cutoff,
    where fp32 eigenvectors are least accurate and the direction is only nearly a partial isometry. The map
    must stay orthogonal there (a closed form that assumed D² from the eigenvectors drifted 4e-5–1e-4 here)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(96, 80) / 80**0.5)
    basis = torch.randn(6, 80)
    optimizer = POET([weight], lr=0.02, poet=POETConfig(block_size=block), rule=RuleConfig(orthogonalize="exact"))
    for _ in range(200):
        inputs = torch.randn(64, 6) @ basis + 0.01 * torch.randn(64, 80)
        ((inputs @ weight.T - torch.randn(64, 96)) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.spectrum_drift() < 3e-6


@pytest.mark.parametrize("rule, variant", [(RuleConfig(redraw_every=3), "bs"), (RuleConfig(name="lie_adam", redraw_every=3), "bs"),
                                           (RuleConfig(redraw_every=3, alternate=False), "fs")])
@pytest.mark.parametrize("chunking", ["cpu", "gpu"])
def test_weights_stepped_as_one_batch_match_each_stepped_alone(rule, variant, chunking, monkeypatch):
    """Same-shaped weights share one set of block products; the result must be each weight's own step,
    in the CPU's chunks (here 2 + 1 of the three 12×10 weights) and in a GPU's (all three at once, stacked:
    one gather, product and write-back for the chunk; with padded blocks, subsets, both sides in turn)."""
    if chunking == "gpu":
        monkeypatch.setattr(primitives, "CHUNK_ENTRIES", {})  # this CPU takes the policy of a device type it does not list
    assert primitives.stacks(torch.empty(1)) == (chunking == "gpu")
    inputs, targets = regression(out=12, inp=10)
    config = POETConfig(variant=variant, block_size=4, fraction=0.5)
    starts = [torch.randn(12, 10, dtype=torch.float64) for _ in range(3)] + [torch.randn(12, 12, dtype=torch.float64)]
    assert [len(chunk) for chunk in optim._chunks([None] * 3, torch.empty(12, 10), 48)] == ([2, 1] if chunking == "cpu" else [3])
    assert [len(chunk) for chunk in optim._chunks([None] * 3, torch.empty(12, 10), 48, spread=3)] == [1, 1, 1]  # one per process

    def loss(weights):
        x = inputs.double()
        hidden = sum(x @ w.T for w in weights[:3])
        return ((torch.tanh(hidden) @ weights[3].T - targets.double()) ** 2).mean()

    together = [nn.Parameter(w.clone()) for w in starts]
    alone = [nn.Parameter(w.clone()) for w in starts]
    named = lambda weights: [(f"layer{i}.weight", w) for i, w in enumerate(weights)]  # noqa: E731
    batched = POET(named(together), lr=0.03, poet=config, rule=rule)
    singles = [POET([pair], lr=0.03, poet=config, rule=rule) for pair in named(alone)]
    for _ in range(7):  # two redraws, both alternation phases
        for weights, optimizers in ((together, [batched]), (alone, singles)):
            loss(weights).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    assert (together[0].detach() - starts[0]).norm() > 1e-3
    for mine, reference in zip(together, alone):
        torch.testing.assert_close(mine.detach(), reference.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(batched.state[together[1]]["out"]["rule"], singles[1].state[alone[1]]["out"]["rule"],
                               atol=1e-12, rtol=1e-12)


def straight_and_resumed(edit_saved=lambda saved: None, count: int = 1):
    """8 steps in one go, and 4 + 4 across a state_dict saved to bytes and loaded (edited by `edit_saved`),
    with a redraw in each half; `count` same-shaped weights step as one batch (their rule states joined)."""
    inputs, targets = regression(out=12, inp=10)
    rule, config = RuleConfig(redraw_every=3), POETConfig(block_size=4)

    def run(weights, optimizer, steps):
        for _ in range(steps):
            sum(((inputs @ weight.T - targets) ** 2).mean() for weight in weights).backward()
            optimizer.step()
            optimizer.zero_grad()

    starts = [torch.randn(12, 10) for _ in range(count)]
    named = lambda weights: [(f"layer{i}.weight", w) for i, w in enumerate(weights)]  # noqa: E731
    straight = [nn.Parameter(start.clone()) for start in starts]
    run(straight, POET(named(straight), lr=0.03, poet=config, rule=rule), 8)
    first = [nn.Parameter(start.clone()) for start in starts]
    optimizer = POET(named(first), lr=0.03, poet=config, rule=rule)
    run(first, optimizer, 4)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    edit_saved(saved)
    resumed = [nn.Parameter(weight.detach().clone()) for weight in first]
    optimizer = POET(named(resumed), lr=0.03, poet=config, rule=rule)
    optimizer.load_state_dict(saved)
    run(resumed, optimizer, 4)
    return (straight[0], resumed[0]) if count == 1 else (straight, resumed)


def test_resuming_from_a_state_dict_continues_exactly():
    straight, resumed = straight_and_resumed()
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("chunking", ["cpu", "gpu"])
def test_weights_batched_together_resume_exactly(chunking, monkeypatch):
    """Batched weights keep their rule states as views of one joined tensor; saved and loaded, they
    continue bit for bit (CPU chunks: 2 + 1 weights; a GPU's: one stacked chunk of 3)."""
    if chunking == "gpu":
        monkeypatch.setattr(primitives, "CHUNK_ENTRIES", {})
    straight, resumed = straight_and_resumed(count=3)
    for mine, reference in zip(resumed, straight):
        assert torch.equal(mine, reference)


def test_momentum_is_stored_packed_and_whole_block_checkpoints_still_resume():
    def unpack_like_an_earlier_version(saved):
        assert saved["state"][0]["out"]["rule"]["momentum"].shape == (3, 4 * 3 // 2)  # 3 blocks 4×4, upper triangles
        for side in ("out", "in"):  # what an earlier version saved: whole skew blocks
            state = saved["state"][0][side]["rule"]
            state["momentum"] = unpack_skew(state["momentum"])

    straight, resumed = straight_and_resumed(unpack_like_an_earlier_version)
    torch.testing.assert_close(resumed.detach(), straight.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("field, value", [("name", "sgd"), ("beta1", 1.0), ("redraw_every", 0), ("orthogonalize", "svd"),
                                          ("direction_dtype", "fp16"), ("nesterov", "false"), ("alternate", None),
                                          ("transport", 0.0), ("redraw_every", True), ("redraw_every", 2.0),
                                          ("beta1", "0.9"), ("beta2", True), ("eps", "1e-8")])
def test_rule_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"RuleConfig.{field}="):
        RuleConfig(**{field: value})


@pytest.mark.parametrize("orthogonalize", ["exact", "newton_schulz"])
def test_a_non_finite_gradient_changes_nothing_and_training_goes_on_from_before_it(orthogonalize):
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(8, 6)) for _ in range(2)]
    optimizer = POET(weights, lr=0.05, poet=POETConfig(block_size=4), rule=RuleConfig(orthogonalize=orthogonalize))
    for weight in weights:
        weight.grad = torch.randn(8, 6)
    optimizer.step()
    untouched_weights, untouched = copy.deepcopy((weights, optimizer))
    weights[0].grad, weights[1].grad = torch.randn(8, 6), torch.randn(8, 6)
    weights[1].grad[2, 3] = float("inf")  # the first weight's step, on the old path, came before the failure
    with pytest.raises(ValueError, match="non-finite gradient.*no weight or optimizer state was changed: skip this batch"):
        optimizer.step()
    for weight, before in zip(weights, untouched_weights):
        assert torch.equal(weight.detach(), before.detach())
    for _ in range(2):  # the clean batches after it: the same steps as from the state before it
        for weight, copied in zip(weights, untouched_weights):
            weight.grad = torch.randn(8, 6)
            copied.grad = weight.grad.clone()
        optimizer.step()
        untouched.step()
    for weight, copied in zip(weights, untouched_weights):
        assert torch.equal(weight.detach(), copied.detach()) and torch.isfinite(weight).all()


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_huge_finite_gradients_step_and_a_nan_among_them_is_refused(bad):
    """The finiteness check reads each gradient's sum; a sum that overflows from finite entries is not a NaN."""
    weight = nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)) / 10)
    optimizer = POET([weight], lr=0.05, poet=POETConfig(block_size=4))
    weight.grad = torch.full((8, 6), 1e37)  # the sum overflows, the skew gradient (2·H·Xᵀ) does not
    assert not torch.isfinite(weight.grad.sum())
    before = weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), before)
    weight.grad[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite gradient"):
        optimizer.step()


def test_poet_optimizer_refuses_vectors_and_low_precision_weights():
    with pytest.raises(ValueError, match="rotates matrices"):
        POET([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="keep the weights in float32"):
        POET([nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="real floating-point matrices"):
        POET([nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="real floating-point matrices; got a parameter of shape \\(4, 4\\) of dtype torch.int64"):
        POET([nn.Parameter(torch.zeros(4, 4, dtype=torch.int64), requires_grad=False)])
    with pytest.raises(ValueError, match="rotates matrices; got '0.bias' of shape \\(4,\\)"):  # named, when names are given
        POET(nn.Sequential(nn.Linear(4, 4)).named_parameters())
    with pytest.raises(ValueError, match="nothing POET can rotate"):  # training would silently do nothing
        POET([nn.Parameter(torch.zeros(6, 6))], poet=POETConfig(variant="fs", fraction=0.1))
    with pytest.raises(ValueError, match="nothing POET can rotate"):
        POET([nn.Parameter(torch.zeros(1, 1))])
    with pytest.raises(TypeError, match="RuleConfig\\(\\*\\*settings\\)"):
        POET([nn.Parameter(torch.zeros(4, 4))], rule={"name": "lie_adam"})
    twice = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="listed twice in one POET param group, so each step would rotate it twice"):
        POET([twice, twice])
    with pytest.raises(TypeError, match="poet_optimizer takes the model .*not a list.*poetlm.POET\\(weights\\)"):
        optim.poet_optimizer([twice])


@pytest.mark.parametrize("group, message", [
    ({"params": [nn.Parameter(torch.randn(7))]}, "rotates matrices"),
    ({"params": [nn.Parameter(torch.randn(7, 5, dtype=torch.bfloat16))]}, "keep the weights in float32"),
    ({"params": [nn.Parameter(torch.randn(1, 1))]}, "nothing POET can rotate"),
    ({"params": [nn.Parameter(torch.randn(7, 5))], "lr": -1.0}, "lr=-1.0 is invalid"),
    ({"params": [nn.Parameter(torch.randn(7, 5))], "lr": float("inf")}, "lr=inf is invalid"),
    ({"params": [nn.Parameter(torch.randn(7, 5))], "weight_decay": 0.1, "momentum": 0.9, "name": "fine"},
     "param groups take no momentum, weight_decay: never read"),
])
def test_an_added_group_is_checked_like_the_constructors_and_not_kept_if_refused(group, message):
    weight = nn.Parameter(torch.randn(8, 6))
    optimizer = POET([weight], lr=0.05, poet=POETConfig(block_size=4))
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group(group)
    assert len(optimizer.param_groups) == 1
    for param in group["params"]:
        param.grad = torch.ones_like(param)
    weight.grad = torch.randn(8, 6)
    optimizer.step()
    assert optimizer.state[weight]["step"] == 1 and list(optimizer.state) == [weight]


def test_an_infinite_lr_is_refused_and_an_added_group_trains_at_its_own_lr():
    with pytest.raises(ValueError, match="lr=inf is invalid: must be a finite number > 0"):
        POET([nn.Parameter(torch.randn(8, 6))], lr=float("inf"))
    weight, added = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(7, 5))
    optimizer = POET([("w.weight", weight)], lr=0.05, poet=POETConfig(block_size=4))
    optimizer.add_param_group({"params": [("a.weight", added)], "lr": 0.1})  # named: coordinates seeded by "a"
    alone = POET([("a.weight", nn.Parameter(added.detach().clone()))], lr=0.1, poet=POETConfig(block_size=4))
    grad = torch.randn(7, 5)
    weight.grad, added.grad, alone.param_groups[0]["params"][0].grad = torch.randn(8, 6), grad, grad.clone()
    optimizer.step()
    alone.step()
    assert torch.equal(added.detach(), alone.param_groups[0]["params"][0].detach())


def test_a_weight_cast_to_low_precision_after_construction_is_refused_before_anything_turns():
    first, second = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8, 6))
    optimizer = POET([first, second], lr=0.05, poet=POETConfig(block_size=4))
    second.data = second.data.bfloat16()
    first.grad, second.grad = torch.randn(8, 6), torch.randn(8, 6, dtype=torch.bfloat16)
    before = first.detach().clone()
    with pytest.raises(ValueError, match="torch.bfloat16 weight of shape \\(8, 6\\).*keep the weights in float32"):
        optimizer.step()
    assert torch.equal(first.detach(), before) and not any(optimizer.state.values())


def test_poet_optimizer_refuses_a_state_whose_coordinates_are_corrupt():
    weight = nn.Parameter(torch.randn(8, 6))
    optimizer = POET([weight], poet=POETConfig(block_size=4))
    weight.grad = torch.randn(8, 6)
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["in"]["index"] = torch.tensor([0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="in side's coordinates of a \\(8, 6\\) weight: a coordinate appears twice"):
        POET([weight], poet=POETConfig(block_size=4)).load_state_dict(state)
    state["state"][0]["in"]["index"] = torch.arange(6)
    POET([weight], poet=POETConfig(block_size=4)).load_state_dict(state)  # a valid permutation loads


def test_poet_optimizer_refuses_a_state_saved_with_other_settings_or_by_another_optimizer():
    weight = nn.Parameter(torch.randn(8, 6))

    def stepped(optimizer):
        weight.grad = torch.randn(8, 6)
        optimizer.step()
        return optimizer.state_dict()

    saved = stepped(POET([weight], lr=0.05, poet=POETConfig(block_size=4)))  # out side: 2 blocks of 4
    other = POET([weight], lr=0.05, poet=POETConfig(block_size=6))  # out side: blocks of 6 and 2, in slots of 6
    with pytest.raises(ValueError, match="the out side's orthogonalized state of a \\(8, 6\\) weight: expected "
                                         "\\{'momentum': \\(2, 15\\)\\}, got \\{'momentum': \\(2, 6\\)\\}; .*other POET settings"):
        other.load_state_dict(saved)
    assert not other.state and other.param_groups[0]["params"] == [weight]  # a refused state is not kept
    stepped(other)  # and the optimizer goes on from its own
    lie_adam = stepped(POET([weight], lr=0.05, poet=POETConfig(block_size=4), rule=RuleConfig(name="lie_adam")))
    with pytest.raises(ValueError, match="orthogonalized state of a \\(8, 6\\) weight: expected \\{'momentum'"):
        POET([weight], lr=0.05, poet=POETConfig(block_size=4)).load_state_dict(lie_adam)
    adamw = stepped(torch.optim.AdamW([weight]))
    with pytest.raises(ValueError, match="lacks \\['draws', 'in', 'initial_spectrum', 'out'\\].*another optimizer's"):
        POET([weight], lr=0.05, poet=POETConfig(block_size=4)).load_state_dict(adamw)


def test_poet_optimizer_for_a_whole_model_schedules_checkpoints_and_resumes_as_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    from poetlm.optim import poet_optimizer

    def build():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, vocab_size=100))
        optimizer = poet_optimizer(model, lr_poet=0.05, lr=1e-2, poet=POETConfig(block_size=8), rule=RuleConfig(redraw_every=2))
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)

    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))

    def train(model, optimizer, scheduler, steps):
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    model, optimizer, scheduler = build()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, optimizer, scheduler, 3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05 * 0.7] + [1e-2 * 0.7] * 2)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    train(model, optimizer, scheduler, 3)
    for name, param in model.named_parameters():
        assert not torch.equal(param, start[name]), name  # the rotated weights and the AdamW ones all trained
        if name.endswith("proj.weight"):
            torch.testing.assert_close(torch.linalg.svdvals(param.detach()), torch.linalg.svdvals(start[name]), atol=1e-5, rtol=0)
    resumed, optimizer2, scheduler2 = build()
    resumed.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    train(resumed, optimizer2, scheduler2, 3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_a_group_added_to_chained_is_refused_with_where_to_add_it():
    from poetlm.optim import Chained, poet_optimizer

    a, d = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    chained = Chained([torch.optim.SGD([a], lr=0.1)])
    with pytest.raises(ValueError, match="optimizers: \\[0\\] SGD.*chained.optimizers\\[1\\].add_param_group\\(group\\)"):
        chained.add_param_group({"params": [d]})
    chained.optimizers[0].add_param_group({"params": [d]})  # where the message points: it trains
    d.grad = torch.ones(3)
    before = d.detach().clone()
    chained.step()
    torch.testing.assert_close(d.detach(), before - 0.1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="\\[0\\] POET, \\[1\\] AdamW"):
        poet_optimizer(model, poet=POETConfig(block_size=4)).add_param_group({"params": [nn.Parameter(torch.randn(3))]})


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda value: pickle.loads(pickle.dumps(value))], ids=["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_exactly_like_the_original(clone):
    from poetlm.optim import poet_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = poet_optimizer(model, lr_poet=0.05, poet=POETConfig(block_size=4), rule=RuleConfig(redraw_every=2))
    x, y = torch.randn(16, 8), torch.randn(16, 3)

    def train(model, optimizer, steps):
        for _ in range(steps):
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    train(model, optimizer, 3)
    copied_model, copied = clone((model, optimizer))  # one copy: the optimizer holds the copied model's weights
    assert isinstance(copied.optimizers[0], POET) and copied.optimizers[0].poet == optimizer.optimizers[0].poet
    train(model, optimizer, 3)  # a redraw, both alternation phases
    train(copied_model, copied, 3)
    for (name, mine), theirs in zip(model.named_parameters(), copied_model.parameters()):
        assert torch.equal(mine, theirs), name


def test_poet_optimizer_leaves_frozen_layers_and_a_plain_models_output_layer_to_others():
    from poetlm.optim import poet_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    start = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = poet_optimizer(model, lr=0.01, poet=POETConfig(block_size=4))
    poet, adamw = optimizer.optimizers
    assert [p for g in poet.param_groups for p in g["params"]] == [model[2].weight]
    assert any(p is model[4].weight for g in adamw.param_groups for p in g["params"])  # the head trains by AdamW
    for name in ("0.weight", "4.weight"):  # neither redrawn as W0
        assert torch.equal(model.get_parameter(name), start[name]), name
    model(torch.randn(16, 8)).square().mean().backward()
    optimizer.step()
    assert torch.equal(model[0].weight, start["0.weight"]) and model[0].weight.grad is None
    torch.testing.assert_close(model[4].weight.detach(), start["4.weight"] - 0.01 * model[4].weight.grad.sign(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="every layer POET would rotate is frozen \\(0, 2\\).*requires_grad_\\(True\\)"):
        poet_optimizer(model.requires_grad_(False), poet=POETConfig(block_size=4))


def test_a_compiled_model_gets_the_weights_and_coordinates_of_the_plain_one():
    from poetlm.optim import poet_optimizer

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))

    plain, compiled = build(), torch.compile(build())  # names gain "_orig_mod."; nothing is compiled until called
    optimizers = [poet_optimizer(model, poet=POETConfig(block_size=4)) for model in (plain, compiled)]
    for _ in range(2):  # the same gradients, without running the compiled model
        for mine, theirs in zip(plain.parameters(), compiled.parameters()):
            mine.grad = torch.randn_like(mine)
            theirs.grad = mine.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for (name, mine), theirs in zip(plain.named_parameters(), compiled.parameters()):
        assert torch.equal(mine, theirs), name
    states = [optimizer.optimizers[0].state.values() for optimizer in optimizers]
    for mine, theirs in zip(*states):
        assert all(torch.equal(mine[side]["index"], theirs[side]["index"]) for side in ("out", "in"))


def test_compiled_block_math_matches_eager_and_does_not_recompile_for_lrs_or_redraws():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    inputs, targets = regression(out=12, inp=10)
    start = torch.randn(12, 10)
    config, rule = POETConfig(block_size=4), RuleConfig(redraw_every=3)
    eager, compiled = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    optimizers = [POET([eager], lr=0.03, poet=config, rule=rule), POET([compiled], lr=0.03, poet=config, rule=rule, compile="aot_eager")]
    for step in range(8):  # two redraws, both alternation phases, a new lr every step
        for weight, optimizer in zip((eager, compiled), optimizers):
            optimizer.param_groups[0]["lr"] = 0.03 / (1 + step)
            ((inputs @ weight.T - targets) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 2  # the orthogonalization and the map, traced
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=1e-5, atol=1e-6)
    assert (eager.detach() - start).norm() > 1e-2


def test_adamw_is_fused_for_plain_parameters_and_steps_as_torchs_loop():
    torch.manual_seed(0)
    start = [torch.randn(300, 8), torch.randn(8)]
    fused_params, loop_params = ([nn.Parameter(t.clone()) for t in start] for _ in range(2))
    fused = optim.adamw([{"params": fused_params[:1]}, {"params": fused_params[1:], "weight_decay": 0.0}], betas=(0.9, 0.95))
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW([{"params": loop_params[:1]}, {"params": loop_params[1:], "weight_decay": 0.0}], betas=(0.9, 0.95),
                             foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(t) for t in start]
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for mine, reference in zip(fused_params, loop_params):
        assert (mine - start[0 if mine.dim() == 2 else 1]).abs().max() > 1e-3
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)


def test_adamw_takes_foreach_for_sharded_cpu_parameters_only_where_it_holds_fewer_temporaries(monkeypatch):
    monkeypatch.setattr(optim, "is_shard", lambda tensor: True)  # FSDP2's DTensors: no fused form for them here
    embedding, head = nn.Parameter(torch.zeros(1000, 8)), nn.Parameter(torch.zeros(8, 1000))
    norms = [nn.Parameter(torch.zeros(8)) for _ in range(4)]
    blocks = [nn.Parameter(torch.zeros(40, 40)) for _ in range(10)]
    beside_poet = optim.adamw([{"params": [embedding, head]}, {"params": norms, "weight_decay": 0.0}])
    assert beside_poet.param_groups[0]["foreach"] is True  # the group: 2 of its largest, the loop holds 3
    assert not beside_poet.param_groups[0]["fused"]
    everything = optim.adamw([{"params": [embedding, head, *blocks]}])
    assert everything.param_groups[0]["foreach"] is False  # foreach would hold a copy of all of it
    elsewhere = optim.adamw([{"params": [nn.Parameter(torch.zeros(8, 8, device="meta"))]}])
    assert elsewhere.param_groups[0]["foreach"] is None and not elsewhere.param_groups[0]["fused"]  # torch chooses
    for parameter in (embedding, head, *norms):  # and either form takes AdamW's step
        parameter.grad = torch.ones_like(parameter)
    beside_poet.step()
    torch.testing.assert_close(embedding.detach(), torch.full_like(embedding, -1e-3))


def test_lie_adam_keeps_the_spectrum_with_whole_side_blocks():
    # Adam-normalized directions have ‖D‖₂ ~ √b: at b=384 and lr 0.02 the truncated series is far from
    # orthogonal (drift ~1e-4 in 30 steps); the fold maps them by the exact Cayley transform instead.
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(384, 384) / 10)
    start = weight.detach().clone()
    x, y = torch.randn(256, 384), torch.randn(256, 384)
    before = torch.linalg.svdvals(weight.detach().double())
    optimizer = POET([weight], lr=0.02, poet=POETConfig(block_size=384), rule=RuleConfig(name="lie_adam"))
    for _ in range(30):
        ((x @ weight.T - y) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = torch.linalg.svdvals(weight.detach().double())
    assert (after - before).abs().max() / before.max() < 1e-6
    assert ((x @ weight.detach().T - y) ** 2).mean() < ((x @ start.T - y) ** 2).mean()


@pytest.mark.parametrize("terms,lr", [(3, 0.05), (1, 0.05), (4, 0.5)])
def test_a_truncated_map_that_is_not_orthogonal_at_the_step_folds_exactly(terms, lr):
    # CNP_k = Cayley·(I − Q^(k+1)): folded every step, odd k or large steps would move the spectrum (1e-4 to 0.2
    # in 300 steps here); the fold takes the exact Cayley transform there instead.
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(32, 48, dtype=torch.float64) / 48**0.5)
    before = torch.linalg.svdvals(weight.detach())
    optimizer = POET([weight], lr=lr, poet=POETConfig(block_size=8, neumann_terms=terms), rule=RuleConfig(orthogonalize="exact"))
    for _ in range(300):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
    assert (torch.linalg.svdvals(weight.detach()) - before).abs().max() / before.max() < 1e-9  # fp64 rounding
    default = POET([nn.Parameter(torch.randn(8, 8))], lr=0.02)  # k = 4 at the default angle: the series itself
    assert default._fold_map(-0.02 * 0.5) == "cayley_neumann" and default._fold_map(-0.5 * 0.5) == "cayley"


def test_spectrum_drift_of_float64_weights_is_read_in_float64():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(32, 24, dtype=torch.float64))
    start = torch.linalg.svdvals(weight.detach())
    optimizer = POET([weight], lr=0.05, poet=POETConfig(block_size=8), rule=RuleConfig(orthogonalize="exact"))
    for _ in range(5):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
    drift = float((torch.linalg.svdvals(weight.detach()) - start).abs().max() / start.max())
    assert drift < 1e-13  # fp64 rounding; an fp32 SVD read ~1e-7
    assert optimizer.spectrum_drift() == pytest.approx(drift, abs=1e-15)
    fp32 = POET([nn.Parameter(torch.randn(8, 6))], poet=POETConfig(block_size=4))
    fp32.param_groups[0]["params"][0].grad = torch.randn(8, 6)
    fp32.step()
    assert next(iter(fp32.state.values()))["initial_spectrum"].dtype == torch.float32  # fp32 weights keep fp32


def test_alternation_skips_a_side_that_cannot_turn():
    weight = nn.Parameter(torch.randn(3, 40))  # fs β=½: the 3-wide side has one coordinate, the 40-wide one 20
    optimizer = POET([weight], lr=0.05, poet=POETConfig(variant="fs", fraction=0.5))
    for _ in range(4):
        weight.grad = torch.randn_like(weight)
        before = weight.detach().clone()
        optimizer.step()
        assert (weight.detach() - before).abs().max() > 1e-3  # every step turns the side that can


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.01])
def test_a_schedulers_lr_that_cannot_be_stepped_with_changes_nothing(lr):
    """An lr is checked at every step as the constructor checks it (0 is a warmup's start, and does nothing)."""
    weight = nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    optimizer = POET([weight], lr=0.05, poet=POETConfig(block_size=4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: [1.0, lr / 0.05][min(step, 1)])
    weight.grad = torch.randn(8, 6)
    optimizer.step()
    scheduler.step()
    before, state = weight.detach().clone(), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=r"param group 0: lr=.* cannot be stepped with, no weight or state was changed"):
        optimizer.step()
    assert torch.equal(weight.detach(), before)
    assert torch.equal(optimizer.state_dict()["state"][0]["out"]["rule"]["momentum"], state["state"][0]["out"]["rule"]["momentum"])
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    assert torch.equal(weight.detach(), before)


def test_a_non_finite_gradient_of_any_chained_parameter_changes_nothing():
    """poet_optimizer's AdamW part would write a NaN bias gradient into its parameter after POET had turned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = optim.poet_optimizer(model, poet=POETConfig(block_size=4))
    model(torch.randn(3, 8)).square().sum().backward()
    model[2].bias.grad[0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="non-finite gradient.*no weight or optimizer state was changed"):
        optimizer.step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not optimizer.state


def test_a_poet_optimizer_whose_weights_were_replaced_says_so():
    """poetize after poet_optimizer trained nothing but the biases, without a word: the optimizer kept the
    replaced weights, which no longer get gradients."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = optim.poet_optimizer(model, poet=POETConfig(block_size=4))
    poetlm.poetize(model, POETConfig(block_size=4))
    model(torch.randn(3, 8)).square().sum().backward()
    with pytest.warns(UserWarning, match=r"none of its 2 weights has a gradient, so nothing turned; were they replaced"):
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        optimizer.step()
