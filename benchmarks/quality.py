"""Validation perplexity at equal tokens: POET-BS, POET-FS, AdamW and Muon, each at its best swept lr.

    python benchmarks/quality.py                         # 2 seeds, 18 runs: ~30 min on a 2-core CPU
    python benchmarks/quality.py --seeds 0 1 2           # the run in docs/benchmarks.md (22 runs, ~35 min)
    python benchmarks/quality.py --steps 100 --seeds 0   # a quicker, noisier look
    python benchmarks/quality.py --report-only           # table and plots from the runs already there

Phase 1 trains every method at every lr of its grid with the first seed (a grid whose best lr is at an
end gets one more lr beyond it, see --extend); phase 2 trains the remaining seeds at each method's best
phase-1 lr. Every run gets the same preset, steps and batch, so the same tokens. Each run is a
`poetlm train` subprocess writing to OUT/NAME; a run whose summary.json exists is
skipped, an interrupted one is resumed from its checkpoint, so rerunning the same command resumes the
whole benchmark. What is swept: AdamW `optim.lr` (every parameter); Muon `optim.lr` (its hidden
matrices and the AdamW part together); POET `optim.lr_poet` (the rotations), with `optim.lr`
(embeddings, norms, head) held at the preset's value. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from common import describe_machine, markdown_table

REPO = Path(__file__).resolve().parent.parent
GRID = [1e-3, 3e-3, 1e-2]  # half-decade steps; the same grid for every method keeps the search effort equal


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    lr_key: str
    overrides: tuple[str, ...]


METHODS = {
    "poet-bs": Method("poet-bs", "POET-BS b=32", "optim.lr_poet",
                      ("method='poet'", "poet.variant='bs'", "poet.block_size=32")),
    "poet-fs": Method("poet-fs", "POET-FS β=½", "optim.lr_poet",
                      ("method='poet'", "poet.variant='fs'", "poet.fraction=0.5")),
    "adamw": Method("adamw", "AdamW", "optim.lr", ("method='adamw'",)),
    "muon": Method("muon", "Muon", "optim.lr", ("method='muon'",)),
}


@dataclass(frozen=True)
class Spec:
    method: Method
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.key}-lr{self.lr:g}-s{self.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="poetlm preset or TOML file (default: tiny)")
    parser.add_argument("--steps", type=int, default=200,
                        help="optimizer steps per run (default 200 = 409,600 tokens on tiny, sized so the 16 runs "
                             "fit in ~50 min on a shared 2-core CPU)")
    parser.add_argument("--eval-every", type=int, default=40, help="steps between validation evaluations (default 40)")
    for key, method in METHODS.items():
        parser.add_argument(f"--lrs-{key}", type=float, nargs="+", default=GRID, metavar="LR",
                            help=f"{method.lr_key} grid for {method.label} (default: {' '.join(f'{x:g}' for x in GRID)})")
    parser.add_argument("--extend", type=int, default=1,
                        help="when a method's best lr is at an end of its grid, add the next lr beyond it (grid "
                             "spacing), up to this many times per method (default 1; 0 = the grid as given)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="the first seed runs the lr sweep, all of them run the best lr (default: 0 1)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/poetlm-quality"), help="root of the run directories")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: one per machine is the fair timing)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: on a CPU shared with other jobs, 2 threads made POET "
                             "3-4x slower, every small op waiting at a barrier for a busy core)")
    parser.add_argument("--device", default="cpu", help="passed to poetlm train (cpu, cuda, auto)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "quality_curves.png")
    parser.add_argument("--lr-plot", type=Path, default=REPO / "docs" / "img" / "quality_lr.png")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the runs already in --out")
    parser.add_argument("--retry-diverged", action="store_true", help="rerun runs recorded as diverged")
    parser.add_argument("--set", dest="extra", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every run, e.g. --set batch_size=8")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.steps < 1:
        parser.error("--jobs, --threads and --steps must be >= 1")
    return args


# ---------------------------------------------------------------- running


def train_command(spec: Spec, args: argparse.Namespace) -> list[str]:
    run_dir = args.out / spec.name
    base = [sys.executable, "-m", "poetlm", "train"]
    # A checkpoint means an interrupted run: continuing it gives exactly the run that was started.
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        return [*base, "--resume", str(run_dir)]
    return [*base, "--preset", args.preset, "--out", str(args.out), "--name", spec.name, "--seed", str(spec.seed),
            "--steps", str(args.steps), "--device", args.device, "--no-progress", *spec.method.overrides,
            f"{spec.method.lr_key}={spec.lr!r}", f"eval_every={args.eval_every}",
            f"checkpoint_every={max(1, args.steps // 4)}",
            # The token cache under the run root keeps the benchmark from writing into the repository.
            f"data.cache_dir='{args.out / 'cache'}'", *args.extra]


def diverged_marker(spec: Spec, args: argparse.Namespace) -> Path:
    return args.out / f"{spec.name}.diverged"


def run_one(spec: Spec, args: argparse.Namespace) -> str:
    run_dir = args.out / spec.name
    if (run_dir / "summary.json").is_file():
        return "done"
    if diverged_marker(spec, args).is_file() and not args.retry_diverged:
        return "diverged"
    command = train_command(spec, args)
    if "--resume" not in command and run_dir.exists():
        shutil.rmtree(run_dir)  # started but never checkpointed: poetlm would otherwise pick NAME-2
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log = args.out / f"{spec.name}.log"
    start = time.perf_counter()
    with log.open("w") as stream:
        stream.write(" ".join(command) + "\n")
        stream.flush()
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    text = log.read_text()
    if code == 0 and (run_dir / "summary.json").is_file():
        print(f"  {spec.name}: {seconds:.0f} s", flush=True)
        return "done"
    if "received: checkpoint" in text or code in (130, 143, -2, -15):
        # The run was stopped by a signal and checkpointed; carrying on would tabulate a half-done benchmark.
        raise KeyboardInterrupt
    if "non-finite loss" in text:
        # A divergence is a result (the lr is too high), not a glitch: keep it, do not retry on resume.
        diverged_marker(spec, args).write_text(text[-2000:])
        print(f"  {spec.name}: diverged after {seconds:.0f} s", flush=True)
        return "diverged"
    print(f"  {spec.name}: FAILED (exit {code}), see {log}", flush=True)
    return "failed"


def run_all(specs: list[Spec], args: argparse.Namespace) -> None:
    todo = [s for s in specs if not (args.out / s.name / "summary.json").is_file()
            and (args.retry_diverged or not diverged_marker(s, args).is_file())]
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already done (or diverged)", flush=True)
    if args.jobs == 1:
        for spec in todo:
            run_one(spec, args)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda s: run_one(s, args), todo))


# ---------------------------------------------------------------- results


def load(spec: Spec, args: argparse.Namespace) -> dict | None:
    """summary.json plus the eval curve; {"diverged": True} for a diverged run; None if not run."""
    run_dir = args.out / spec.name
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        curve = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "val_ppl" in record:
                curve.append((record["tokens"], record["val_ppl"]))
        return {**summary, "curve": curve}
    if diverged_marker(spec, args).is_file():
        return {"diverged": True}
    return None


def final_ppl(result: dict | None) -> float:
    if result is None:
        return math.nan
    return math.inf if result.get("diverged") else result["final_val_ppl"]


def best_lr(method: Method, lrs: list[float], seed: int, args: argparse.Namespace) -> float | None:
    scored = [(final_ppl(load(Spec(method, lr, seed), args)), lr) for lr in lrs]
    scored = [(ppl, lr) for ppl, lr in scored if not math.isnan(ppl) and ppl != math.inf]
    return min(scored)[1] if scored else None


def beyond_edge(lrs: list[float], best: float | None) -> float | None:
    """The next lr past the grid end that won, at the grid's own spacing; None if the best is inside."""
    grid = sorted(lrs)
    if best is None or len(grid) < 2 or grid[0] < best < grid[-1]:
        return None
    ratio = grid[-1] / grid[-2] if best == grid[-1] else grid[0] / grid[1]
    return float(f"{best * ratio:.1g}")  # 1e-2 * (1e-2/3e-3) = 0.0333… -> 0.03, keeping run names readable


def extend_grids(args: argparse.Namespace, lrs: dict[str, list[float]]) -> None:
    """A best lr at the end of a grid is only a bound; try one step further, for every method alike."""
    seed = args.seeds[0]
    for _ in range(args.extend):
        new = {}
        for key in args.methods:
            lr = beyond_edge(lrs[key], best_lr(METHODS[key], lrs[key], seed, args))
            if lr is not None and lr not in lrs[key]:
                if args.report_only and load(Spec(METHODS[key], lr, seed), args) is None:
                    continue
                new[key] = lr
        if not new:
            return
        print(f"best lr at a grid end, extending: {', '.join(f'{k} {lr:g}' for k, lr in new.items())}", flush=True)
        for key, lr in new.items():
            lrs[key] = sorted(lrs[key] + [lr])
        if not args.report_only:
            run_all([Spec(METHODS[k], lr, seed) for k, lr in new.items()], args)


def fmt_ppl(values: list[float]) -> str:
    if not values:
        return "—"
    if any(v == math.inf for v in values):
        return "diverged"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def table(args: argparse.Namespace, lrs: dict[str, list[float]], best: dict[str, float | None]) -> str:
    rows = []
    for key in args.methods:
        method = METHODS[key]
        for lr in lrs[key]:
            seeds = args.seeds if lr == best[key] else args.seeds[:1]
            results = {s: load(Spec(method, lr, s), args) for s in seeds}
            done = {s: r for s, r in results.items() if r is not None}
            values = [final_ppl(r) for r in done.values()]
            finished = [r for r in done.values() if not r.get("diverged")]
            params = finished[0]["block_linear_trainable_params"] if finished else None
            rates = [r["tokens_per_s"] for r in finished if r.get("tokens_per_s")]
            per_seed = ", ".join("div." if final_ppl(r) == math.inf else f"{final_ppl(r):.2f}" for r in done.values())
            rows.append([method.label + (" **best**" if lr == best[key] else ""), f"{method.lr_key}={lr:g}",
                         len(done), fmt_ppl(values), per_seed or "—",
                         f"{params:,}" if params is not None else "—",
                         f"{statistics.median(rates):.0f}" if rates else "—"])
    headers = ["method", "swept lr", "seeds", "final val ppl (mean ± sd)", "per seed", "block-linear params", "tokens/s"]
    return markdown_table(headers, rows, align="llrrrrr")


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at the token counts every seed evaluated (all of them, for equal configs)."""
    common = set.intersection(*(set(t for t, _ in c) for c in curves))
    tokens = sorted(common)
    return tokens, [statistics.fmean(dict(c)[t] for c in curves) for t in tokens]


def _axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # the object API on an Agg canvas: headless, no pyplot global state
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def plot_curves(args, best, path: Path) -> None:
    fig, ax = _axes(f"validation perplexity at equal tokens ({args.preset}, {args.steps} steps)",
                    "training tokens", "validation perplexity (mean over seeds)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1e3:g}k"))
    for key in args.methods:
        if best[key] is None:
            continue
        method = METHODS[key]
        curves = [r["curve"] for s in args.seeds if (r := load(Spec(method, best[key], s), args)) and "curve" in r]
        if not curves:
            continue
        tokens, ppl = mean_curve(curves)
        ax.plot(tokens, ppl, marker="o", markersize=3,
                label=f"{method.label}, {method.lr_key.split('.')[-1]}={best[key]:g} (n={len(curves)}): {ppl[-1]:.1f}")
    save(fig, ax, path)


def save(fig: Figure, ax, path: Path) -> None:
    if not ax.lines:  # never replace a published plot with an empty one (e.g. --report-only on an empty --out)
        print(f"nothing to plot, {path} left as it was")
        return
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 200, not 2×10²
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 4, 6)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    print(f"wrote {path}")


def plot_lr(args, lrs, path: Path) -> None:
    fig, ax = _axes(f"lr sweep, seed {args.seeds[0]} ({args.preset}, {args.steps} steps)",
                    "swept learning rate (lr_poet for POET, lr for AdamW / Muon)", "final validation perplexity")
    for key in args.methods:
        method = METHODS[key]
        points = [(lr, final_ppl(load(Spec(method, lr, args.seeds[0]), args))) for lr in lrs[key]]
        diverged = [f"{lr:g}" for lr, p in points if p == math.inf]
        points = [(lr, p) for lr, p in points if math.isfinite(p)]
        if points:
            note = f" ({', '.join(diverged)} diverged)" if diverged else ""
            ax.plot(*zip(*points), marker="o", label=method.label + note)
    ax.set_xscale("log")
    save(fig, ax, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        benchmark(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {args.out}; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def benchmark(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)  # so the machine description reports what the runs use
    args.out.mkdir(parents=True, exist_ok=True)
    lrs = {key: getattr(args, f"lrs_{key.replace('-', '_')}") for key in args.methods}
    print(describe_machine(args.device), flush=True)
    start = time.perf_counter()
    if not args.report_only:
        print(f"phase 1: lr sweep, seed {args.seeds[0]}", flush=True)
        run_all([Spec(METHODS[k], lr, args.seeds[0]) for k in args.methods for lr in lrs[k]], args)
    extend_grids(args, lrs)
    best = {k: best_lr(METHODS[k], lrs[k], args.seeds[0], args) for k in args.methods}
    if not args.report_only and len(args.seeds) > 1:
        print(f"phase 2: seeds {args.seeds[1:]} at each method's best lr", flush=True)
        run_all([Spec(METHODS[k], best[k], s) for k in args.methods if best[k] is not None for s in args.seeds[1:]], args)
    text = table(args, lrs, best)
    print(f"\n{args.preset}, {args.steps} steps × {load_tokens_per_run(args, best)} "
          f"(best lr chosen on seed {args.seeds[0]}; sd over seeds {args.seeds})\n")
    print(text)
    (args.out / "quality.md").write_text(text + "\n")
    if hasattr(os, "getloadavg"):
        print(f"\nload average after the run: {os.getloadavg()[0]:.2f}; wall time {time.perf_counter() - start:.0f} s")
    plot_curves(args, best, args.plot)
    plot_lr(args, lrs, args.lr_plot)


def load_tokens_per_run(args, best) -> str:
    totals = {r["total_tokens"] for k in args.methods if best[k] is not None
              for s in args.seeds if (r := load(Spec(METHODS[k], best[k], s), args)) and "total_tokens" in r}
    return " / ".join(f"{t:,} tokens" for t in sorted(totals)) or "? tokens"


if __name__ == "__main__":
    main()
