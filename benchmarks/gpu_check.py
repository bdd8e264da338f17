"""Correctness on a device against CPU fp64: POET's layer form (both paths, bf16 build, merges) and its optimizer.

    python benchmarks/gpu_check.py                          # CUDA, the sizes gpu.sh checks
    python benchmarks/gpu_check.py --device cpu --small     # the same checks on CPU at small sizes (no GPU)

Failures are bugs, not round-off: a wrong permutation, block or side is an O(1) error. Exits 1 on any miss.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from common import markdown_table
from poetlm import POETConfig, POETLinear, step_weight_cache
from poetlm.optim import POET
from poetlm.update_rules import RuleConfig

LAYER_TOL = {"fwd fp32": 1e-5, "fwd bf16": 3e-2, "grad fp32": 1e-4, "fwd bf16-build": 2e-2, "grad bf16-build": 5e-2,
             "merge fp32": 1e-5, "merge fp64": 1e-12}
STEP_TOL = {"ΔW fp32": 1e-3, "drift fp32": 1e-5}
# A bf16 direction (rule.direction_dtype) moves the weight a little differently; the spectrum must hold.
BF16_DIRECTION_TOL = {"ΔW fp32": 3e-2, "drift fp32": 1e-5}
CONFIGS = {"bs b=64": dict(variant="bs", block_size=64), "bs b=256": dict(variant="bs", block_size=256),
           "fs β=½": dict(variant="fs", fraction=0.5)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def rotation_grads(layer: POETLinear) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in layer.rotation_parameters()])


def layer_rows(device: torch.device, shape: tuple[int, int], tokens: tuple[int, int]) -> tuple[list, bool]:
    """POETLinear on `device` in fp32 (and with a bf16 build) against the same layer in fp64 on CPU."""
    in_features, out_features = shape
    rows, failed = [], False
    for name, kwargs in CONFIGS.items():
        for mode in ("weight", "input"):
            config = POETConfig(forward_mode=mode, **kwargs)
            ref = POETLinear(in_features, out_features, config=config, name="check", dtype=torch.float64)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for side in (ref.rotation_in, ref.rotation_out):  # ‖Q‖ of a trained block, not the identity
                    side.skew.copy_(torch.randn(side.skew.shape, generator=gen, dtype=torch.float64) * 0.02)
                ref.bias.copy_(torch.randn(out_features, generator=gen, dtype=torch.float64))
            layer = POETLinear(in_features, out_features, config=config, name="check", device=device)
            layer.load_state_dict(ref.state_dict())  # copy_ casts to fp32 and moves to the device
            half = POETLinear(in_features, out_features, config=POETConfig(forward_mode=mode, build_dtype="bf16", **kwargs),
                              name="check", device=device)
            half.load_state_dict(ref.state_dict())
            x = torch.randn(*tokens, in_features, generator=gen, dtype=torch.float64)
            g = torch.randn(*tokens, out_features, generator=gen, dtype=torch.float64)
            y_ref = ref(x)
            y_ref.backward(g)
            xd, gd = x.float().to(device), g.float().to(device)
            y = layer(xd)
            y.backward(gd)
            with step_weight_cache(half):  # the training step's path: one build, gradients carried on exit
                y_half = half(xd)
                y_half.backward(gd)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                y_bf16 = layer(xd)
            with torch.no_grad():
                before = layer(xd)
                layer.merge()
                merged = rel(layer(xd), before)
                before = ref(x)
                ref.merge()
                merged64 = rel(ref(x), before)
            errors = {"fwd fp32": rel(y, y_ref), "fwd bf16": rel(y_bf16, y_ref),
                      "grad fp32": rel(rotation_grads(layer), rotation_grads(ref)),
                      # The bf16 build matters only on the weight path; the input path ignores it.
                      "fwd bf16-build": rel(y_half, y_ref), "grad bf16-build": rel(rotation_grads(half), rotation_grads(ref)),
                      "merge fp32": merged, "merge fp64": merged64}
            ok = all(errors[k] <= LAYER_TOL[k] for k in LAYER_TOL)
            failed |= not ok
            rows.append([name, mode] + [f"{errors[k]:.1e}" for k in LAYER_TOL] + ["ok" if ok else "FAIL"])
    return rows, failed


def optimizer_rows(device: torch.device, shape: tuple[int, int], steps: int = 3) -> tuple[list, bool]:
    """`poetlm.optim.POET` steps on `device` in fp32 against the same steps in fp64 on CPU (same gradients).
    The "4 weights" row steps four same-shaped weights together: off the CPU they form one batch."""
    in_features, out_features = shape
    rows, failed = [], False
    gen = torch.Generator().manual_seed(2)
    starts = [torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) / in_features ** 0.5 for _ in range(4)]
    grads = [[torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) for _ in starts] for _ in range(steps)]
    # The reference runs the device's orthogonalization ("auto" would pick the exact one, or bf16 products,
    # on a CPU); the bf16 direction has a row of its own.
    newton_schulz = RuleConfig(orthogonalize="newton_schulz", direction_dtype="fp32")
    cases = [(name, kwargs, newton_schulz, STEP_TOL, 1, torch.float64) for name, kwargs in CONFIGS.items()]
    cases.append(("bs b=64, 4 weights", CONFIGS["bs b=64"], newton_schulz, STEP_TOL, 4, torch.float64))
    # Exact directions in fp32 leave planes below 1e-3·σ_max at rest (fp64: 1e-7), so the reference is the
    # CPU's fp32: this row checks the device's eigh and closed-form map, not the floor.
    cases.append(("bs b=256, exact, vs fp32 on CPU", CONFIGS["bs b=256"], RuleConfig(orthogonalize="exact"), STEP_TOL, 1,
                  torch.float32))
    cases.append(("bs b=256, bf16 direction (ΔW ≤ 3e-2)", CONFIGS["bs b=256"],
                  RuleConfig(orthogonalize="newton_schulz", direction_dtype="bf16"), BF16_DIRECTION_TOL, 1, torch.float64))
    for name, kwargs, rule, tolerance, count, reference_dtype in cases:
        config = POETConfig(**kwargs)
        moved = {}
        for key, dev, dtype in (("ref", torch.device("cpu"), reference_dtype), ("device", device, torch.float32)):
            weights = [torch.nn.Parameter(start.to(device=dev, dtype=dtype, copy=True)) for start in starts[:count]]
            optimizer = POET([(f"w{i}.weight", w) for i, w in enumerate(weights)], lr=0.02, poet=config,
                             rule=dataclasses.replace(rule, direction_dtype="fp32") if key == "ref" else rule)
            for step_grads in grads:
                for weight, grad in zip(weights, step_grads):
                    weight.grad = grad.to(device=dev, dtype=dtype)
                optimizer.step()
            moved[key] = [weight.detach().double().cpu() for weight in weights]
        # Drift measured in fp64 of the device's weights: an fp32 SVD on the GPU has a noise floor of its own.
        deltas, drifts = [], []
        for start, ours, reference in zip(starts, moved["device"], moved["ref"]):
            sigma0, sigma = torch.linalg.svdvals(start), torch.linalg.svdvals(ours)
            deltas.append(rel(ours - start, reference - start))
            drifts.append(float((sigma - sigma0).abs().max() / sigma0.max()))
        errors = {"ΔW fp32": max(deltas), "drift fp32": max(drifts)}
        ok = all(errors[k] <= tolerance[k] for k in tolerance)
        failed |= not ok
        rows.append([name] + [f"{errors[k]:.1e}" for k in STEP_TOL] + ["ok" if ok else "FAIL"])
    return rows, failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="96→160 layers and 2×32 tokens instead of 512→1280 and 4×256")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available (use --device cpu --small to run the checks here)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    shape, tokens = ((96, 160), (2, 32)) if args.small else ((512, 1280), (4, 256))
    torch.manual_seed(0)
    print(f"## POETLinear {shape[0]}→{shape[1]}, {tokens[0]}×{tokens[1]} tokens: {device} (fp32, bf16) vs fp64 on CPU\n")
    rows, layer_failed = layer_rows(device, shape, tokens)
    print(markdown_table(["config", "path"] + [f"{k} (≤{v:g})" for k, v in LAYER_TOL.items()] + ["result"], rows,
                         align="ll" + "r" * (len(LAYER_TOL) + 1)))
    print("\nrelative errors ‖a−b‖/‖b‖; bf16-build: build_dtype='bf16' through step_weight_cache; merge: output "
          "after merge() vs before, same layer\n")
    print(f"## POET optimizer, a {shape[1]}×{shape[0]} weight, 3 steps: {device} fp32 vs fp64 on CPU\n")
    rows, step_failed = optimizer_rows(device, shape)
    print(markdown_table(["config"] + [f"{k} (≤{v:g})" for k, v in STEP_TOL.items()] + ["result"], rows, align="lrrr"))
    print("\nΔW: the weight's change over the steps, relative to the reference's (fp64; the exact row fp32); drift: max |Δσ| / σ_max")
    sys.exit(1 if layer_failed or step_failed else 0)


if __name__ == "__main__":
    main()
