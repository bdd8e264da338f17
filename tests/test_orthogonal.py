import math

import pytest
import torch

from poetlm import orthogonal
from poetlm.orthogonal import (cayley, cayley_neumann, choose_direction, gram_singular_values, isometry_increment, orthogonal_map,
                               orthogonalize_skew, rotation_increment, skew_from_packed)
from reference import cnp_formula, exact_cayley, skew_from_triangle_loop


def random_skew(b: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, b, generator=g, dtype=torch.float64) * scale
    return a - a.T


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_cayley_neumann_matches_formula(k):
    q = random_skew(7, 0.1, seed=k)
    torch.testing.assert_close(cayley_neumann(q, k), cnp_formula(q, k), rtol=0, atol=1e-13)


def test_exact_cayley_is_orthogonal_and_matches_inverse_formula():
    q = random_skew(9, 0.5)
    c = cayley(q)
    eye = torch.eye(9, dtype=torch.float64)
    assert (c @ c.T - eye).abs().max() < 1e-10
    assert abs(torch.linalg.det(c) - 1) < 1e-10
    torch.testing.assert_close(c, exact_cayley(q), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_neumann_error_identity(k):
    # CNP − Cayley = −Cayley·Q^{k+1}
    q = random_skew(6, 0.2, seed=10 + k)
    lhs = cayley_neumann(q, k) - cayley(q)
    rhs = -cayley(q) @ torch.linalg.matrix_power(q, k + 1)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-14)


def test_exp_map_is_matrix_exponential_and_zero_gives_identity():
    q = random_skew(5, 0.3)
    torch.testing.assert_close(orthogonal_map(q, "exp"), torch.linalg.matrix_exp(q))
    zero = torch.zeros(3, 4, 4, dtype=torch.float64)
    for name in ("cayley_neumann", "cayley", "exp"):
        assert torch.equal(orthogonal_map(zero, name), torch.eye(4, dtype=torch.float64).expand(3, 4, 4))


@pytest.mark.parametrize("name, terms", [("cayley_neumann", 3), ("cayley_neumann", 4), ("cayley", 4), ("exp", 4)])
def test_rotation_increment_is_the_map_minus_identity_to_its_own_precision(name, terms):
    q64 = torch.stack([random_skew(16, 3e-3, seed=s) for s in range(3)])
    reference = exact_cayley_or_map(q64, name, terms) - torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(rotation_increment(q64, name, terms), reference, rtol=0, atol=1e-15)
    # In float32 the increment (‖·‖ ~ 1e-2) keeps ~7 digits of itself; I + increment rounded to float32
    # (what a float32 map returns) keeps only ~7 digits of 1, i.e. ~5 of the increment.
    error = (rotation_increment(q64.float(), name, terms).double() - reference).abs().max() / reference.abs().max()
    formed = (orthogonal_map(q64.float(), name, terms).double() - torch.eye(16, dtype=torch.float64) - reference)
    assert error < 1e-6 < formed.abs().max() / reference.abs().max()


def exact_cayley_or_map(q: torch.Tensor, name: str, terms: int) -> torch.Tensor:
    if name == "exp":
        return torch.linalg.matrix_exp(q)
    if name == "cayley":
        return torch.stack([exact_cayley(block) for block in q])
    return torch.stack([cnp_formula(block, terms) for block in q])


@pytest.mark.parametrize("name, terms", [("cayley_neumann", 3), ("cayley_neumann", 4), ("cayley", 4), ("exp", 4)])
@pytest.mark.parametrize("size", [6, 7])  # an odd block has a kernel, where the rotation must stay I
def test_the_closed_form_map_of_an_exact_direction_is_the_map_itself(name, terms, size):
    directions = orthogonalize_skew(torch.stack([random_skew(size, 1.0, seed=s) for s in range(3)]), "exact")
    for scale in (-0.01, 0.4):
        reference = exact_cayley_or_map(scale * directions, name, terms) - torch.eye(size, dtype=torch.float64)
        closed = isometry_increment(directions, scale, name, terms)
        torch.testing.assert_close(closed, reference, rtol=0, atol=1e-13)
    # In float32 the rotation it gives is as orthogonal as the general map's (both ~1e-7)
    eye = torch.eye(size)
    rotation = eye + isometry_increment(directions.float(), -0.01, name, terms)
    general = eye + rotation_increment(-0.01 * directions.float(), name, terms)
    assert (rotation.mT @ rotation - eye).abs().max() <= 2 * (general.mT @ general - eye).abs().max() + 1e-7


@pytest.mark.parametrize("scale", [1e-3, -0.02, 0.4])
def test_the_closed_form_map_turns_a_plane_by_the_maps_exact_angle(scale):
    """exp(s·J) turns by s, Cayley by the angle with tan(θ/2) = s: cos and sin to float64's last digits (the
    rotation is folded every step, so an error here is a spectrum drift that grows with the steps)."""
    plane = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    cayley_angle = 2 * math.atan(scale)
    for name, angle in (("exp", scale), ("cayley", cayley_angle)):
        expected = torch.tensor([[math.cos(angle) - 1, math.sin(angle)], [-math.sin(angle), math.cos(angle) - 1]],
                                dtype=torch.float64)
        torch.testing.assert_close(isometry_increment(plane, scale, name), expected, rtol=0, atol=1e-16)


def test_auto_orthogonalizes_exactly_only_for_large_blocks_on_a_cpu_without_fast_bf16(monkeypatch):
    monkeypatch.setattr(orthogonal, "fast_bf16_products", lambda device: False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_direction("auto", "auto", 256, cpu) == choose_direction("auto", "fp32", 384, cpu) == ("exact", "fp32")
    assert choose_direction("auto", "auto", 64, cpu) == choose_direction("auto", "auto", 256, cuda) == ("newton_schulz", "fp32")
    # bf16 asked for where it is slow: the products would be emulated, so auto keeps the exact path
    assert choose_direction("auto", "bf16", 256, cpu) == ("exact", "bf16")
    assert choose_direction("newton_schulz", "auto", 512, cpu) == ("newton_schulz", "fp32")
    assert choose_direction("exact", "bf16", 8, cuda) == ("exact", "bf16")
    a = torch.stack([random_skew(200, 1.0, seed=s) for s in range(2)])
    assert torch.equal(orthogonalize_skew(a, "auto"), orthogonalize_skew(a, "exact"))


def test_fast_bf16_products_is_a_property_of_cpus_with_amx_only(monkeypatch):
    assert orthogonal.fast_bf16_products(torch.device("cuda")) is False  # launch-bound there: fp32 stays
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert orthogonal.fast_bf16_products(torch.device("cpu")) is torch.backends.mkldnn.is_available()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert orthogonal.fast_bf16_products(torch.device("cpu")) is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch: no claim of speed
    assert orthogonal.fast_bf16_products(torch.device("cpu")) is False


def test_auto_takes_bf16_newton_schulz_where_bf16_products_are_fast(monkeypatch):
    monkeypatch.setattr(orthogonal, "fast_bf16_products", lambda device: device.type == "cpu")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for block in (128, 256, 384):
        assert choose_direction("auto", "auto", block, cpu) == ("newton_schulz", "bf16")
    assert choose_direction("auto", "auto", 64, cpu) == ("newton_schulz", "fp32")  # small blocks: bf16 gains nothing
    assert choose_direction("auto", "fp32", 256, cpu) == ("exact", "fp32")  # fp32 asked for: LAPACK is the faster
    assert choose_direction("exact", "auto", 256, cpu) == ("exact", "bf16")  # the exact path ignores the precision
    assert choose_direction("auto", "auto", 256, cuda) == ("newton_schulz", "fp32")
    # orthogonalize_skew on fp32 blocks reads "auto" as fp32 products: exact at 256 on any CPU
    a = torch.stack([random_skew(200, 1.0, seed=s) for s in range(2)])
    assert torch.equal(orthogonalize_skew(a, "auto"), orthogonalize_skew(a, "exact"))


def test_packed_parameters_fill_strict_upper_triangles_with_padding_for_a_small_last_block():
    sizes, b = [4, 4, 3], 4
    values = torch.arange(1, 6 + 6 + 3 + 1, dtype=torch.float64)
    q = skew_from_packed(values, sizes, b)
    torch.testing.assert_close(q[0], skew_from_triangle_loop(values[:6], 4))
    torch.testing.assert_close(q[1], skew_from_triangle_loop(values[6:12], 4))
    torch.testing.assert_close(q[2, :3, :3], skew_from_triangle_loop(values[12:], 3))
    assert torch.all(q[2, 3, :] == 0) and torch.all(q[2, :, 3] == 0)
    blocks = orthogonal_map(q, "cayley_neumann", 3)
    assert blocks[2, 3, 3] == 1 and torch.all(blocks[2, 3, :3] == 0)


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96)])
def test_gram_singular_values_match_an_fp64_svd_even_for_tiny_singular_values(shape):
    # What a GPU weight's spectrum is measured with (singular_values off the CPU): a Gaussian matrix with
    # a spread spectrum, and one exact zero singular value (σ near 0 is where a Gram matrix loses digits).
    generator = torch.Generator().manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=generator, dtype=torch.float64), full_matrices=False)
    sigma = torch.logspace(0, -6, min(shape), dtype=torch.float64)
    sigma[-1] = 0
    weight = (u * sigma) @ vh
    ours = gram_singular_values(weight.float())
    assert ours.shape == sigma.shape and bool((ours[:-1] >= ours[1:]).all())
    assert (ours - sigma).abs().max() <= 3e-8 * sigma.max()
    assert (torch.linalg.svdvals(weight.float()).double() - sigma).abs().max() > (ours - sigma).abs().max()  # finer than fp32's SVD
