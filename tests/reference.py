"""Independent dense references built straight from the definitions in the spec (loops, explicit matrices)."""

import torch


def skew_from_triangle_loop(values: torch.Tensor, size: int) -> torch.Tensor:
    q = torch.zeros(size, size, dtype=values.dtype)
    k = 0
    for i in range(size):
        for j in range(i + 1, size):
            q[i, j] = values[k]
            q[j, i] = -values[k]
            k += 1
    return q


def cnp_formula(q: torch.Tensor, k: int) -> torch.Tensor:
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    series = sum(torch.linalg.matrix_power(q, j) for j in range(k + 1))
    return (eye + q) @ series


def exact_cayley(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def block_matrices(side, parameterization: str, k: int) -> list[torch.Tensor]:
    """Each block's orthogonal matrix, from the packed parameters, one block at a time."""
    out, offset = [], 0
    values = side.skew.detach().double()
    for size in side.block_sizes:
        n = size * (size - 1) // 2
        q = skew_from_triangle_loop(values[offset:offset + n], size)
        offset += n
        if parameterization == "cayley_neumann":
            out.append(cnp_formula(q, k))
        elif parameterization == "cayley":
            out.append(exact_cayley(q))
        else:
            out.append(torch.linalg.matrix_exp(q))
    return out


def dense_rotation(side, variant: str, parameterization: str = "cayley_neumann", k: int = 3) -> torch.Tensor:
    """The full dim×dim rotation of one side: Ψᵀ·Diag(G…)·Ψ (bs) or I − SSᵀ + S·G·Sᵀ (fs)."""
    dim = side.dim
    blocks = block_matrices(side, parameterization, k)
    index = side.index.cpu()
    if variant == "bs":
        psi = torch.zeros(dim, dim, dtype=torch.float64)
        psi[torch.arange(dim), index] = 1.0  # (Ψx)_i = x_{index[i]}
        return psi.T @ torch.block_diag(*blocks) @ psi
    if not blocks:
        return torch.eye(dim, dtype=torch.float64)
    select = torch.zeros(dim, len(index), dtype=torch.float64)
    select[index, torch.arange(len(index))] = 1.0
    return torch.eye(dim, dtype=torch.float64) - select @ select.T + select @ blocks[0] @ select.T


def dense_weight(layer, parameterization: str = "cayley_neumann", k: int = 3) -> torch.Tensor:
    """weight_eff = Pᵀ · W0ᵀ · Rᵀ in torch's (out, in) orientation, in fp64."""
    variant = layer.config.variant
    r = dense_rotation(layer.rotation_in, variant, parameterization, k)
    p = dense_rotation(layer.rotation_out, variant, parameterization, k)
    return p.T @ layer.weight0.double() @ r.T
