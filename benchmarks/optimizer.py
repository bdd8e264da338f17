"""Time one optimizer step on a preset's block weights alone: POET (fold form) against AdamW.

    python benchmarks/optimizer.py                                  # llama-60m, b=64 and 256, both orthogonalizations
    python benchmarks/optimizer.py --preset tiny --blocks 32 128 384 --orthogonalize newton_schulz
    python benchmarks/optimizer.py --device cuda --preset llama-350m
    python benchmarks/optimizer.py --blocks 64 --orthogonalize newton_schulz --profile   # where a step's time goes
    python benchmarks/optimizer.py --orthogonalize newton_schulz --chunks gpu   # the ops a GPU's step dispatches

The weights are the preset's q/k/v/o/gate/up/down matrices (random, with random gradients); no model,
no data: what is left is the optimizer's own work per step, the part of a POET step that does not
shrink with more tokens per step. After two untimed steps, --repeats steps (rounded up to even) are
timed and a step's time is the median of their pairs' means, one step of each alternating side in a pair
(one torch thread on CPU; CUDA synchronized around each step). "ops/step" counts the torch ops the step dispatches itself
(views included): where kernel launches bound a step, as on GPUs at these sizes, that is its cost.
"exact" rows map their directions in closed form (`orthogonal.isometry_increment`, one product);
"auto", POET's default, is exact from b = 192 on a CPU and Newton–Schulz elsewhere.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import (CHUNKS_HELP, batch_rotations_as, describe_machine, interleaved_times, markdown_table, step_median,
                    synchronizer)
from cost_model import preset_shape
from poetlm import POETConfig, RuleConfig
from poetlm.optim import POET, adamw


def block_weights(preset: str, seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    shape = preset_shape(preset)
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for _ in range(shape.layers):
        for out, inp in shape.linears():
            weight = torch.nn.Parameter((torch.randn(out, inp, generator=generator) / inp**0.5).to(device))
            weight.grad = (torch.randn(out, inp, generator=generator) * 1e-3).to(device)
            weights.append(weight)
    return weights


def median_step(optimizer: torch.optim.Optimizer, repeats: int, sync) -> float:
    # Two untimed steps: states are created on the first; compiled math traces both alternating sides.
    return step_median(interleaved_times({"step": optimizer.step}, repeats, warmup=2, sync=sync)["step"])


def dispatched_ops(optimizer: torch.optim.Optimizer) -> int:
    """Torch ops called directly by one step (not the ops those call in turn)."""
    from torch.profiler import profile

    with profile() as prof:
        optimizer.step()
    return sum(1 for event in prof.events() if event.cpu_parent is not None and event.cpu_parent.name.startswith("Optimizer.step"))


def top_ops(optimizer: torch.optim.Optimizer, sync, rows: int = 12) -> str:
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(2):
            optimizer.step()
        sync()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-60m")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--orthogonalize", nargs="+", default=["newton_schulz", "exact"], choices=["newton_schulz", "exact", "auto"])
    parser.add_argument("--direction-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "auto"],
                        help="rule.direction_dtype values to time (auto: bf16 on CPUs with AMX, else fp32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps, rounded up to even")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--profile", action="store_true", help="also list the top ops of two steps per POET row")
    parser.add_argument("--chunks", choices=["device", "gpu", "cpu"], default="device", help=CHUNKS_HELP)
    parser.add_argument("--compile", metavar="BACKEND", help="also time the fp32 Newton–Schulz rows with POET(compile=BACKEND), "
                        "e.g. inductor: the block math compiled (compile time not counted)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batch_rotations_as(args.chunks)
    torch.set_num_threads(args.threads)
    print(describe_machine(args.device))
    sync = synchronizer(args.device)
    rows = []
    reference = adamw([{"params": block_weights(args.preset, device=args.device), "lr": 1e-3}])  # the training app's
    adamw_seconds = median_step(reference, args.repeats, sync)
    rows.append(["AdamW", f"{adamw_seconds:.3f}", "1.00", dispatched_ops(reference)])
    for block in args.blocks:
        for method in args.orthogonalize:
            for dtype in args.direction_dtypes if method != "exact" else ["fp32"]:
                compiled = args.compile and method == "newton_schulz" and dtype == "fp32"  # each compile takes a while
                for backend in [None] + ([args.compile] if compiled else []):
                    # Only non-default options are passed, so older src/ (the docs' "before") runs.
                    poet = POET(block_weights(args.preset, device=args.device), lr=0.02, poet=POETConfig(block_size=block),
                                rule=RuleConfig(orthogonalize=method, **({} if dtype == "fp32" else {"direction_dtype": dtype})),
                                **({"compile": backend} if backend else {}))
                    seconds = median_step(poet, args.repeats, sync)
                    label = (f"POET b={block}, {method}" + (f" ({dtype})" if method != "exact" else "")
                             + (f", compiled ({backend})" if backend else ""))
                    if args.profile:
                        print(f"{label}:\n{top_ops(poet, sync)}\n")
                    rows.append([label, f"{seconds:.3f}", f"{seconds / adamw_seconds:.2f}", dispatched_ops(poet)])
                    print(f"  done {label}: {seconds:.3f} s", file=sys.stderr, flush=True)  # kept if a time limit cuts the run
    chunks = f", batched as on a {args.chunks.upper()}" if args.chunks != "device" else ""
    print(f"#### {args.preset}: one optimizer step over the block weights{chunks}\n")
    print(markdown_table(["optimizer", "s/step", "× AdamW", "ops/step"], rows))


if __name__ == "__main__":
    main()
