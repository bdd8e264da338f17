"""Forward+backward time and peak memory of POETLinear against nn.Linear at the paper's LLaMA layer shapes.

    python benchmarks/layer.py                      # CUDA if available, else the quick CPU run
    python benchmarks/layer.py --device cpu --full  # every shape and token count on CPU (slow)
    python benchmarks/layer.py --hidden 2048 --tokens 16384 --dtype bf16
    python benchmarks/layer.py --device cpu --threads 1 --compile   # every POET layer torch.compile'd

One call = forward, then backward with a fixed upstream gradient; the input requires grad (a layer
inside a network) and every gradient is freed before the call, so gradient buffers are allocated
(and counted) each time, as in training with zero_grad(set_to_none=True). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

import torch
from torch import nn

from common import (DTYPES, announce, default_device, interleaved_times, markdown_table, paired_ratio,
                    peak_memory_bytes, step_median, synchronizer, timed_rounds)
from cost_model import cnp_build_macs
from poetlm import POETConfig, POETLinear

FFN = {512: 1280, 768: 2048, 2048: 5376}  # the paper's LLaMA 60M / 130M / 1.3B widths
CONFIGS = {
    "bs b=64": POETConfig(variant="bs", block_size=64),
    "bs b=128": POETConfig(variant="bs", block_size=128),
    "bs b=256": POETConfig(variant="bs", block_size=256),
    "fs β=½": POETConfig(variant="fs", fraction=0.5),
}
PATHS = ("weight", "input")
QUICK = {"hidden": [512, 768], "tokens": [2048], "repeats": 5, "warmup": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--hidden", type=int, nargs="+", choices=sorted(FFN), help="hidden sizes (default: all)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per call (default: 2048 16384)")
    parser.add_argument("--repeats", type=int, help="timed calls per contender, rounded up to even (default: 20, quick: 5)")
    parser.add_argument("--warmup", type=int, help="untimed rounds before timing (default: 3, quick: 1)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--ffn-down", action="store_true", help="also time the FFN→hidden shape")
    parser.add_argument("--compile", action="store_true", help="torch.compile every POET layer (the warmup round "
                        "compiles; nn.Linear stays eager, as a compiled model's single GEMMs would be)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="hidden 512 768, 2048 tokens, 5 repeats (CPU default)")
    mode.add_argument("--full", action="store_true", help="no quick defaults, even on CPU")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    # A full CPU run takes far longer than anyone waits for by accident, so CPU starts quick.
    args.quick = args.quick or (args.device == "cpu" and not args.full)
    defaults = QUICK if args.quick else {"hidden": sorted(FFN), "tokens": [2048, 16384], "repeats": 20, "warmup": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:  # explicit flags beat the quick defaults
            setattr(args, key, value)
    return args


def flop_model(layer: POETLinear, tokens: int, input_centric: bool) -> int:
    """Multiply-adds of one forward+backward (see docs/benchmarks.md for the derivation)."""
    t, n_in, n_out = tokens, layer.in_features, layer.out_features
    c_in, c_out = layer.rotation_in.flops_per_vector, layer.rotation_out.flops_per_vector
    cube = sum(side.n_blocks * side.block ** 3 for side in (layer.rotation_in, layer.rotation_out))
    build = cnp_build_macs(layer.config.neumann_terms, cube)
    if input_centric:
        # W0 is frozen: its GEMM needs no weight gradient, but every token is rotated on both sides.
        return 2 * t * n_in * n_out + 3 * t * (c_in + c_out) + build
    # Rotating W0 needs no gradient into W0, only into the blocks; the second rotation needs both.
    return 3 * t * n_in * n_out + 2 * n_out * c_in + 3 * n_in * c_out + build


def make_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(clear, run): clear drops every gradient a call makes (x's too), run is one forward+backward."""
    params = [p for p in module.parameters() if p.requires_grad]

    def clear() -> None:
        for p in params:
            p.grad = None
        x.grad = None

    def run() -> None:
        module(x).backward(grad_out)

    return clear, run


def timed(clear: Callable[[], None], run: Callable[[], None]) -> Callable[[], None]:
    """A timed call frees the previous call's gradients first, as zero_grad(set_to_none=True) in training."""
    def step() -> None:
        clear()
        run()

    return step


def call_peaks(calls: dict, device: str) -> dict:
    """Peak bytes of each (clear, run) call; gradients are cleared outside the measured call, since every
    contender shares x and a free of x.grad from another contender's call is none of this call's."""
    peaks = {}
    for key, (clear, run) in calls.items():
        clear()
        peaks[key] = peak_memory_bytes(run, device)
    return peaks


def bench_shape(n_in: int, n_out: int, tokens: int, args: argparse.Namespace) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(tokens, n_out, generator=generator).to(device=device, dtype=dtype)

    calls = {"linear": make_step(nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype), x, grad_out)}
    layers, auto_input = {}, {}
    for name, config in CONFIGS.items():
        for path in PATHS:
            layer = POETLinear(n_in, n_out, bias=False, config=dataclasses.replace(config, forward_mode=path),
                               name=f"bench.{n_in}x{n_out}", device=device, dtype=dtype)
            layers[name, path] = layer
            calls[name, path] = make_step(torch.compile(layer) if args.compile else layer, x, grad_out)
        # The layer's own cost model decides "auto"; a meta-device copy answers without allocating.
        auto = POETLinear(n_in, n_out, bias=False, config=dataclasses.replace(config, forward_mode="auto"), device="meta")
        auto_input[name] = auto.uses_input_centric(tokens)

    times = interleaved_times({key: timed(*call) for key, call in calls.items()}, args.repeats, args.warmup,
                              synchronizer(device))
    memory = call_peaks(calls, device)

    linear_flops = 3 * tokens * n_in * n_out
    rows = [dict(shape=f"{n_in}→{n_out}", tokens=tokens, config="nn.Linear", path="—", auto=None,
                 ms=1e3 * step_median(times["linear"]), ratio=1.0, ideal=1.0, mb=_mb(memory["linear"]), mem_ratio=1.0)]
    for (name, path), layer in layers.items():
        input_centric = path == "input"
        rows.append(dict(
            shape=f"{n_in}→{n_out}", tokens=tokens, config=name, path=path, auto=auto_input[name] == input_centric,
            ms=1e3 * step_median(times[name, path]), ratio=paired_ratio(times[name, path], times["linear"]),
            ideal=flop_model(layer, tokens, input_centric) / linear_flops, mb=_mb(memory[name, path]),
            mem_ratio=_ratio(memory[name, path], memory["linear"])))
    return rows


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(rows: list[dict]) -> str:
    headers = ["shape", "tokens", "config", "path", "auto", "time ms", "× linear", "ideal ×", "peak MB", "mem ×"]
    body = [[r["shape"], r["tokens"], r["config"], r["path"], "✓" if r["auto"] else "",
             _fmt(r["ms"], ".2f" if r["ms"] < 10 else ".1f"), _fmt(r["ratio"], ".2f"), _fmt(r["ideal"], ".2f"),
             _fmt(r["mb"], ".1f"), _fmt(r["mem_ratio"], ".2f")] for r in rows]
    return markdown_table(headers, body, align="lrllcrrrrr")


def auto_report(rows: list[dict]) -> list[str]:
    """Did "auto" pick the path that was measured faster? One line per disagreement."""
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["path"] in PATHS:
            pairs.setdefault((r["shape"], r["tokens"], r["config"]), {})[r["path"]] = r
    lines, agree = [], 0
    for (shape, tokens, config), by_path in pairs.items():
        picked = next(path for path, r in by_path.items() if r["auto"])
        faster = min(by_path, key=lambda path: by_path[path]["ms"])
        if picked == faster:
            agree += 1
        else:
            lines.append(f"  {shape} T={tokens} {config}: auto picks {picked} "
                         f"({by_path[picked]['ms']:.1f} ms), {faster} measured {by_path[faster]['ms']:.1f} ms")
    return [f"auto picked the measured-faster path in {agree} of {len(pairs)} cases"] + lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    announce("layer.py", argv, args.device, args.threads)
    print(f"device {args.device}, dtype {args.dtype}, hidden {args.hidden}, tokens {args.tokens}, "
          f"{timed_rounds(args.repeats)} repeats after {args.warmup} warmup round(s)")
    if args.quick:
        print("QUICK RUN: a subset of shapes and few repeats (pass --full, or --hidden/--tokens, for more)")
    print(flush=True)
    rows = []
    for hidden in args.hidden:
        shapes = [(hidden, hidden), (hidden, FFN[hidden])] + ([(FFN[hidden], hidden)] if args.ffn_down else [])
        for n_in, n_out in shapes:
            for tokens in args.tokens:
                shape_rows = bench_shape(n_in, n_out, tokens, args)
                print(f"  done {n_in}→{n_out} T={tokens}: nn.Linear {shape_rows[0]['ms']:.1f} ms", file=sys.stderr, flush=True)
                rows += shape_rows
    print(render(rows))
    print()
    print("\n".join(auto_report(rows)))


if __name__ == "__main__":
    main()
