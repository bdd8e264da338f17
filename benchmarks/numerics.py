"""Spectrum drift of a repeatedly merged POET weight, and orthogonality error of the Cayley–Neumann map.

    python benchmarks/numerics.py                 # both tables plus a calibration run (~3 min on 1 CPU thread)
    python benchmarks/numerics.py --no-calibrate  # skip measuring the update sizes training produces
    python benchmarks/numerics.py --merges 10 100 1000 --sigmas 1e-3 3e-3 1e-2 3e-2 --block 64

Drift: one POETLinear (out×in, block-stochastic), each cycle gets fresh random skew parameters with
entries N(0, σ²) on both sides and is merged with `POETLinear.merge` (new permutations every time, as
in training). "bf16" simulates a layer whose W0 is stored in bf16 by rounding W0 after every merge;
poetlm itself keeps W0 in fp32. drift = max_i |σ_i − σ0_i| / σ0_max, singular values in fp64.

Orthogonality: ‖G·Gᵀ − I‖_F/√b of one random b×b skew block scaled to a given spectral norm ‖Q‖₂,
computed in fp64 so that truncation error shows below fp32 round-off. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from common import announce, markdown_table
from poetlm import POETConfig, POETLinear, merge, model_diagnostics, poet_layers
from poetlm.orthogonal import orthogonal_map
from poetlm.train.config import PAPER_NEUMANN_TERMS

MAPS = {"cayley": ("cayley", 3), "cnp k=1": ("cayley_neumann", 1), "cnp k=2": ("cayley_neumann", 2),
        "cnp k=3": ("cayley_neumann", 3), "cnp k=4": ("cayley_neumann", 4)}
DEFAULT_MAP = f"cnp k={POETConfig.neumann_terms}"  # POETConfig's default parameterization and neumann_terms
PAPER_MAP = f"cnp k={PAPER_NEUMANN_TERMS}"  # the paper's, which method poet-paper keeps
MARKERS = {DEFAULT_MAP: " ← default", PAPER_MAP: " (paper)"}
TARGET = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[256, 512], metavar=("OUT", "IN"))
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--merges", type=int, nargs="+", default=[10, 100, 1000], help="report drift after these merge counts")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2], help="std of each skew entry per cycle")
    parser.add_argument("--maps", nargs="+", choices=list(MAPS), default=list(MAPS))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--norms", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
                        help="spectral norms ‖Q‖₂ for the orthogonality table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small ops, shared machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="skip training the tiny preset to measure the ‖Q‖ it reaches by each merge")
    parser.add_argument("--calibrate-merges", type=int, default=2, help="merge cycles of the tiny preset to measure")
    args = parser.parse_args(argv)
    args.merges = sorted(set(args.merges))  # drift_run fills its columns in merge-count order
    return args


def predicted_singular_change(norm: float, k: int) -> float:
    """Largest |σ(G) − 1| of CNP for a block with ‖Q‖₂ = norm.

    G = C·(I − Q^{k+1}) with C the exact (orthogonal) Cayley factor, and Q^{k+1} is normal with
    eigenvalues (±iλ)^{k+1}: odd k gives the real factor 1 ∓ λ^{k+1} (first order: k=1 expands by
    λ², k=3 contracts by λ⁴), even k an imaginary one with modulus √(1 + λ^{2k+2}) (second order).
    √(1 + x) − 1 is written x / (√(1 + x) + 1): computed as it reads, it rounds to 0 for x below ~1e-16
    (λ = 0.015 at k = 4), which the table would print as exact Cayley's "0".
    """
    if k % 2:
        return norm ** (k + 1)
    x = norm ** (2 * k + 2)
    return x / (math.sqrt(1 + x) + 1)


def block_spectral_norms(layer: POETLinear) -> torch.Tensor:
    return torch.cat([torch.linalg.matrix_norm(side.skew_blocks().double(), ord=2)
                      for side in (layer.rotation_in, layer.rotation_out)])


@torch.no_grad()
def drift_run(map_name: str, precision: str, sigma: float, args: argparse.Namespace) -> tuple[list[float], float]:
    """Drift at each checkpoint in args.merges, and the median ‖Q‖₂ of the blocks over the run."""
    out_features, in_features = args.shape
    parameterization, terms = MAPS[map_name]
    config = POETConfig(variant="bs", block_size=args.block, parameterization=parameterization,
                        neumann_terms=terms, seed=args.seed)
    layer = POETLinear(in_features, out_features, bias=False, config=config, name="numerics")
    bf16 = precision == "bf16"
    if bf16:  # drift is measured against the bf16 W0, not against the rounding of the fp32 draw
        layer.weight0.copy_(layer.weight0.to(torch.bfloat16).float())
    sigma0 = torch.linalg.svdvals(layer.weight0.double())
    # The same update sequence for every map and precision, so rows differ only by map and storage.
    generator = torch.Generator().manual_seed(args.seed + 1)
    drifts, norms = [], []
    for count in range(1, max(args.merges) + 1):
        for side in (layer.rotation_in, layer.rotation_out):
            side.skew.copy_(torch.randn(side.skew.shape, generator=generator) * sigma)
        if count <= 10:
            norms.append(block_spectral_norms(layer))
        layer.merge()
        if bf16:
            layer.weight0.copy_(layer.weight0.to(torch.bfloat16).float())
        if not torch.isfinite(layer.weight0).all():  # k=1 expands every merge and overflows at large σ
            drifts += [math.inf] * sum(n >= count for n in args.merges)
            break
        if count in args.merges:
            sigma_now = torch.linalg.svdvals(layer.weight0.double())
            drifts.append(float((sigma_now - sigma0).abs().max() / sigma0.max()))
    return drifts, float(torch.cat(norms).median())


def drift_table(args: argparse.Namespace) -> tuple[str, dict]:
    rows, results = [], {}
    for sigma in args.sigmas:
        for map_name in args.maps:
            for precision in args.precisions:
                drifts, q_norm = drift_run(map_name, precision, sigma, args)
                results[sigma, map_name, precision] = (drifts, q_norm)
                k = MAPS[map_name][1]
                per_merge = predicted_singular_change(q_norm, k) if MAPS[map_name][0] == "cayley_neumann" else 0.0
                marker = MARKERS.get(map_name, "") if precision == "fp32" else ""
                rows.append([f"{sigma:.0e}", f"{q_norm:.3f}", map_name + marker, precision,
                             f"{per_merge:.1e}" if per_merge else "0"] + [f"{d:.2e}" for d in drifts])
        print(f"  done σ={sigma:g}", file=sys.stderr, flush=True)
    headers = ["entry σ", "‖Q‖₂ med", "map", "W0", "σ(G) dev. per merge (pred.)"] + [f"drift @{n}" for n in args.merges]
    return markdown_table(headers, rows, align="rrllr" + "r" * len(args.merges)), results


def random_skew(b: int, norm: float, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(b, b, generator=generator, dtype=torch.float64)
    q = a - a.T
    return q * (norm / torch.linalg.matrix_norm(q, ord=2))


def orthogonality_table(args: argparse.Namespace) -> str:
    b = args.block
    generator = torch.Generator().manual_seed(args.seed)
    eye = torch.eye(b, dtype=torch.float64)
    ks = [MAPS[m][1] for m in args.maps if MAPS[m][0] == "cayley_neumann"]

    def error(g: torch.Tensor) -> float:
        g = g.double()
        return float(torch.linalg.matrix_norm(g @ g.T - eye) / math.sqrt(b))

    rows = []
    for norm in args.norms:
        q = random_skew(b, norm, generator)
        # A random skew's entries have std ‖Q‖₂ / (2√b·√2)-ish; report the measured one to map σ to ‖Q‖₂.
        entry_std = float(q[torch.triu_indices(b, b, 1).unbind()].std())
        row = [f"{norm:g}", f"{entry_std:.1e}"]
        row += [f"{error(orthogonal_map(q, 'cayley_neumann', k)):.1e}" for k in ks]
        row += [f"{error(orthogonal_map(q.float(), 'cayley_neumann', 3)):.1e}",
                f"{error(orthogonal_map(q.float(), 'cayley')):.1e}"]
        rows.append(row)
    headers = ["‖Q‖₂", "entry std"] + [f"cnp k={k}" for k in ks] + ["cnp k=3 fp32", "cayley fp32"]
    return markdown_table(headers, rows)


def calibrate(args: argparse.Namespace) -> str:
    """‖Q‖ that real training reaches by each merge: the tiny preset on its bundled corpus, CPU, fp32."""
    from poetlm.train.config import resolve_config
    from poetlm.train.loop import TrainState, load_data, train_step
    from poetlm.train.methods import build_schedulers, make_method
    from poetlm.train.models import load_model
    from poetlm.train.parallel import Runtime

    config = resolve_config("tiny", ["method='poet-paper'", "device=cpu", "dtype=fp32", "progress=false"])
    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    data = load_data(config, runtime)
    torch.manual_seed(config.seed)
    method = make_method(config)
    model = method.prepare(load_model(config, data.tokenizer))
    optimizers = method.optimizers(model)
    schedulers = build_schedulers(optimizers, config)
    state = TrainState()
    rows = []
    start = time.perf_counter()
    while len(rows) < args.calibrate_merges:
        train_step(method, model, model, optimizers, data, config, state, runtime, None)
        for scheduler in schedulers:
            scheduler.step()
        state.step += 1
        if state.step % config.poet.merge_every == 0:
            with torch.no_grad():
                layers = [layer for _, layer in poet_layers(model)]
                spectral = torch.cat([block_spectral_norms(layer) for layer in layers])
                entries = torch.cat([side.skew.detach().double() for layer in layers
                                     for side in (layer.rotation_in, layer.rotation_out)])
            q = torch.quantile(spectral, torch.tensor([0.5, 0.9], dtype=torch.float64))
            k = config.poet.neumann_terms
            rows.append([state.step, f"{float(entries.pow(2).mean().sqrt()):.1e}", f"{float(q[0]):.3f}",
                         f"{float(q[1]):.3f}", f"{float(spectral.max()):.3f}",
                         f"{predicted_singular_change(float(q[0]), k):.1e}", f"{predicted_singular_change(float(spectral.max()), k):.1e}"])
            merge(model, optimizers[0])
            state.last_merge_step = state.step
            # POET can only move singular values through CNP's non-orthogonality: this is the drift itself.
            drift = model_diagnostics(model, spectrum=True)["spectrum_drift_max"]
            rows[-1].append(f"{drift:.1e}")
    headers = ["merge at step", "entry rms", "‖Q‖₂ median", "‖Q‖₂ p90", "‖Q‖₂ max", "σ(G) dev. at median (pred.)",
               "σ(G) dev. at max (pred.)", "drift after merge (max over layers)"]
    note = (f"tiny preset: bs b={config.poet.block_size}, lr_poet={config.optim.lr_poet:g}, merge_every={config.poet.merge_every}, "
            f"CNP k={config.poet.neumann_terms}; {state.step} steps in {time.perf_counter() - start:.0f} s")
    return note + "\n\n" + markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    announce("numerics.py", argv, "cpu", args.threads)
    out_features, in_features = args.shape
    print(f"layer {out_features}×{in_features} (out×in), bs b={args.block}, merges {args.merges}, entry σ {args.sigmas}\n", flush=True)
    start = time.perf_counter()
    table, results = drift_table(args)
    print("### Spectrum drift after repeated merges\n")
    print(table)
    for who, map_name in (("default", DEFAULT_MAP), ("poet-paper", PAPER_MAP)):
        if map_name not in args.maps or "fp32" not in args.precisions:
            continue
        print()
        for sigma in args.sigmas:
            drifts, q_norm = results[sigma, map_name, "fp32"]
            verdict = "within" if drifts[-1] <= TARGET else f"{drifts[-1] / TARGET:.0f}× above"
            print(f"{who} ({map_name}, fp32 W0), σ={sigma:g} (‖Q‖₂≈{q_norm:.3f}): drift {drifts[-1]:.2e} "
                  f"after {max(args.merges)} merges, {verdict} the {TARGET:g} target")
    print("\n### Orthogonality error ‖GGᵀ − I‖_F/√b (fp64 unless marked)\n")
    print(orthogonality_table(args))
    print(f"\n({time.perf_counter() - start:.0f} s)", flush=True)
    if args.calibrate:
        print("\n### ‖Q‖ that training reaches by a merge\n")
        print(calibrate(args))


if __name__ == "__main__":
    main()
