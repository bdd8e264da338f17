"""Validation perplexity at equal tokens and equal time: POET, POET-paper, AdamW and Muon, each at its best lr.

    python benchmarks/quality.py --jobs 2 --img docs/img    # the run in docs/benchmarks.md (2 corpora, 2 seeds)
    python benchmarks/quality.py --ablation --jobs 2        # the ablation: the paper's POET, then one change at a time
    python benchmarks/quality.py --steps 100 --seeds 0 --corpora sotu   # a quicker, noisier look
    python benchmarks/quality.py --report-only              # table and plots from the runs already there

For each corpus, phase 1 trains every method at every lr of its grid with the first seed (a grid whose
best lr is at an end gets one more lr beyond it, see --extend); phase 2 trains the remaining seeds at each
method's best phase-1 lr. Every run gets the same preset, steps and batch, so the same tokens. Each run is a
`poetlm train` subprocess writing to OUT/CORPUS/NAME (CORPUS: the corpus's file stem, with a hash where two
corpora share one); a run whose summary.json exists is skipped, an
interrupted one is resumed from its checkpoint, so rerunning the same command resumes the whole benchmark.

What is swept is each method's block-matrix lr; embeddings, norms and head train with AdamW at the
preset's optim.lr for every method: AdamW `optim.lr_hidden`, Muon `optim.lr_muon`, POET `optim.lr_poet`
(radians per step of the orthogonalized rule), POET-paper `optim.lr_poet` (AdamW's lr on the skew
parameters, merges every poet.merge_every steps, CNP k=3). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
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

from common import describe_machine, markdown_table, refuse_bad_settings, refuse_other_settings, setting_differences
from poetlm.cli import at_least

@dataclass(frozen=True)
class Method:
    key: str
    label: str
    lr_key: str
    grid: tuple[float, ...]
    overrides: tuple[str, ...] = ()


METHODS = {
    "poet": Method("poet", "POET (default)", "optim.lr_poet", (0.01, 0.02, 0.04), ("method='poet'",)),
    "poet-paper": Method("poet-paper", "POET-paper", "optim.lr_poet", (2e-3, 4e-3, 1e-2), ("method='poet-paper'",)),
    "adamw": Method("adamw", "AdamW", "optim.lr_hidden", (3e-4, 1e-3, 3e-3), ("method='adamw'",)),
    "muon": Method("muon", "Muon", "optim.lr_muon", (1e-3, 3e-3, 1e-2), ("method='muon'",)),
}
# The ablation: the paper's POET, then one change at a time towards the default, each at one lr. Its first
# and last rows are the "poet-paper" and "poet" runs of the sweep (pass their lrs with --lrs-poet-paper /
# --lrs-poet); the rows between pin the paper form's block size (b=32 at tiny), so the last step to the
# default ("poet") is the preset's block size.
PAPER_SHAPE = ("poet.block_size=32",)
# The rule's own rows ran with exact orthogonalization (docs/benchmarks.md); "auto" has since picked
# Newton–Schulz below b=192 on a CPU, so they pin it for the command to reproduce them.
EXACT = ("rule.orthogonalize='exact'",)
ABLATION = {
    "abl-k4": Method("abl-k4", "+ CNP k=4 (spectrum-exact)", "optim.lr_poet", (4e-3,),
                     ("method='poet-paper'", "poet.neumann_terms=4")),
    "abl-cayley": Method("abl-cayley", "(side row) paper with the exact Cayley map instead of CNP", "optim.lr_poet",
                         (4e-3,), ("method='poet-paper'", "poet.parameterization='cayley'")),
    "abl-fold": Method("abl-fold", "+ fold every step, Adam moments kept in the Lie algebra (redraw every 50)",
                       "optim.lr_poet", (2e-2,), ("method='poet'", "rule.name='lie_adam'", "rule.alternate=false",
                                                  *PAPER_SHAPE)),
    "abl-ortho": Method("abl-ortho", "+ orthogonalized momentum (Muon on so(b)), lr = angle", "optim.lr_poet", (0.04,),
                        ("method='poet'", "rule.nesterov=false", "rule.alternate=false", "rule.transport=false",
                         *PAPER_SHAPE, *EXACT)),
    "abl-nesterov": Method("abl-nesterov", "+ Nesterov", "optim.lr_poet", (0.04,),
                           ("method='poet'", "rule.alternate=false", "rule.transport=false", *PAPER_SHAPE,
                            *EXACT)),
    "abl-alternate": Method("abl-alternate", "+ alternating sides", "optim.lr_poet", (0.04,),
                            ("method='poet'", "rule.transport=false", *PAPER_SHAPE, *EXACT)),
    "abl-transport": Method("abl-transport", "+ momentum transported across redraws", "optim.lr_poet", (0.04,),
                            ("method='poet'", *PAPER_SHAPE, *EXACT)),
}
ABLATION_ROWS = ["poet-paper", *ABLATION, "poet"]
ALL_METHODS = {**METHODS, **ABLATION}


@dataclass(frozen=True)
class Spec:
    method: Method
    lr: float
    seed: int
    corpus: str

    @property
    def name(self) -> str:
        return f"{self.method.key}-lr{self.lr:g}-s{self.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="poetlm preset or TOML file (default: tiny)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000 = 2.05M tokens on tiny)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations (default 100)")
    parser.add_argument("--corpora", nargs="+", default=["sotu", "shakespeare"], help="bundled corpora or files (default: sotu shakespeare)")
    for key, method in ALL_METHODS.items():
        parser.add_argument(f"--lrs-{key}", type=at_least(0, float, above=True), nargs="+", default=list(method.grid), metavar="LR",
                            help=f"{method.lr_key} grid for {method.label} (default: {' '.join(f'{x:g}' for x in method.grid)})")
    parser.add_argument("--extend", type=int, default=2,
                        help="when a method's best lr is at an end of its grid, add the next lr beyond it (grid "
                             "spacing), up to this many times per method (default 2; 0 = the grid as given)")
    parser.add_argument("--methods", nargs="+", choices=list(ALL_METHODS), help="default: poet, poet-paper, adamw, muon (or the ablation rows)")
    parser.add_argument("--ablation", action="store_true", help="run the ablation rows (first corpus, first seed) instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="the first seed runs the lr sweep, all of them run the best lr (default: 0 1)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/poetlm-quality"), help="root of the run directories")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: on a CPU shared with other jobs, 2 threads made POET "
                             "3-4x slower, every small op waiting at a barrier for a busy core)")
    parser.add_argument("--device", default="cpu", help="passed to poetlm train (cpu, cuda, auto)")
    parser.add_argument("--img", type=Path, help="where the plots go (default: OUT/img; the published ones: --img docs/img)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the runs already in --out")
    parser.add_argument("--retry-diverged", action="store_true", help="rerun runs recorded as diverged")
    parser.add_argument("--set", dest="extra", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every run, e.g. --set batch_size=8")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.steps < 1:
        parser.error("--jobs, --threads and --steps must be >= 1")
    refuse_bad_settings(parser, args.preset, [f"steps={args.steps}", f"eval_every={args.eval_every}", *args.extra])
    if args.methods is None:
        args.methods = list(ABLATION_ROWS if args.ablation else METHODS)
    # A value given twice would start two runs of one spec in one directory at once and tabulate it twice.
    args.methods, args.corpora, args.seeds = unique(args.methods), unique(args.corpora), unique(args.seeds)
    for key in ALL_METHODS:
        setattr(args, lrs_option(key), unique(getattr(args, lrs_option(key))))
    unknown = [corpus for corpus in args.corpora if not corpus_exists(corpus)]
    if unknown:
        from poetlm.train.data import BUNDLED_CORPORA

        parser.error(f"--corpora: {unknown[0]!r} is neither a bundled corpus ({', '.join(BUNDLED_CORPORA)}) nor an "
                     "existing file or directory, nor hf:NAME[:CONFIG]")
    # Absolute, so that the run paths and data.cache_dir in the runs' settings read alike however --out is spelled.
    args.out = args.out.resolve()
    args.img = args.img or args.out / "img"
    if args.ablation:
        args.corpora, args.seeds = args.corpora[:1], args.seeds[:1]
    args.corpus_dirs = corpus_dirs(args.corpora)
    args.failed = set()  # run directories whose run failed in this invocation (not a result: retried when rerun)
    return args


def unique(values: list) -> list:
    return list(dict.fromkeys(values))


def lrs_option(key: str) -> str:
    return f"lrs_{key.replace('-', '_')}"


def corpus_exists(corpus: str) -> bool:
    """What poetlm reads as a corpus (hf: specs are checked when their run loads them)."""
    from poetlm.train.data import BUNDLED_CORPORA

    return corpus.startswith("hf:") or corpus in BUNDLED_CORPORA or Path(corpus).expanduser().exists()


def corpus_dirs(corpora: list[str]) -> dict[str, str]:
    """Each corpus's directory under OUT (and name in tables and plot files): its file stem, unless two corpora
    share one (/a/data.txt and /b/data.txt, hf:a/x and hf:b/x): those get the stem and a hash of the corpus as
    given, as one directory would hand the second corpus the first one's finished runs. (The hash is of the
    spelling, not the resolved path: two spellings of one file are two runs, never two writers of one run.)"""
    stems = [Path(corpus).stem for corpus in corpora]
    return {corpus: stem if stems.count(stem) == 1 else f"{stem}-{hashlib.sha1(corpus.encode()).hexdigest()[:8]}"
            for corpus, stem in zip(corpora, stems)}


# ---------------------------------------------------------------- running


def run_dir(spec: Spec, args: argparse.Namespace) -> Path:
    return args.out / args.corpus_dirs[spec.corpus] / spec.name


def run_settings(spec: Spec, args: argparse.Namespace) -> list[str]:
    """The KEY=VALUE overrides of a run (on top of --preset): what makes two runs of one name the same run."""
    return [f"seed={spec.seed}", f"steps={args.steps}", f"device='{args.device}'", f"data.data='{spec.corpus}'",
            # Every seed is scored on one validation split (the split would otherwise follow the seed).
            "data.split_seed=0", *spec.method.overrides, f"eval_every={args.eval_every}",
            f"checkpoint_every={max(1, args.steps // 4)}",
            # The token cache under the run root keeps the benchmark from writing into the repository.
            f"data.cache_dir='{args.out / 'cache'}'", *args.extra,
            f"{spec.method.lr_key}={spec.lr!r}"]  # last: a --set cannot change the swept lr under its run name


def train_command(spec: Spec, args: argparse.Namespace) -> list[str]:
    directory = run_dir(spec, args)
    base = [sys.executable, "-m", "poetlm", "train"]
    # A checkpoint means an interrupted run: continuing it gives exactly the run that was started.
    if (directory / "checkpoints").is_dir() and any((directory / "checkpoints").iterdir()):
        return [*base, "--resume", str(directory)]
    return [*base, "--preset", args.preset, "--out", str(directory.parent), "--name", spec.name, "--no-progress",
            *run_settings(spec, args)]


def settings_mismatch(spec: Spec, args: argparse.Namespace) -> str | None:
    """Why the run already in OUT under this spec's name was made with other settings, or None: a run is
    reused (or resumed) only if it is the run these settings would make."""
    saved = run_dir(spec, args) / "config.json"
    if not saved.is_file():
        return None
    from poetlm.train.config import resolve_config
    from poetlm.train.runs import absolute_places

    # As the run recorded them: a relative corpus path is saved absolute.
    wanted = absolute_places(resolve_config(args.preset, [f"name='{spec.name}'", *run_settings(spec, args)])).to_dict()
    # Where the run and its token cache live is not what it computed (a moved or differently spelled --out).
    differ = setting_differences(wanted, json.loads(saved.read_text()), ignore=("out_dir", "progress", "data.cache_dir"))
    return f"{', '.join(differ)} differ" if differ else None


def diverged_marker(spec: Spec, args: argparse.Namespace) -> Path:
    directory = run_dir(spec, args)
    return directory.parent / f"{directory.name}.diverged"  # not with_suffix: "lr0.001-s0" has a dot


def run_one(spec: Spec, args: argparse.Namespace) -> str:
    directory = run_dir(spec, args)
    if (directory / "summary.json").is_file():
        return "done"
    if diverged_marker(spec, args).is_file():
        if not args.retry_diverged:
            return "diverged"
        shutil.rmtree(directory, ignore_errors=True)  # a resume would continue the diverged run as it was
        diverged_marker(spec, args).unlink()
    args.failed.discard(directory)
    command = train_command(spec, args)
    if "--resume" not in command and directory.exists():
        shutil.rmtree(directory)  # started but never checkpointed: poetlm would otherwise pick NAME-2
    directory.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log = directory.parent / f"{directory.name}.log"
    start = time.perf_counter()
    with log.open("w") as stream:
        stream.write(" ".join(command) + "\n")
        stream.flush()
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    text = log.read_text()
    if code == 0 and (directory / "summary.json").is_file():
        print(f"  {spec.corpus}/{spec.name}: {seconds:.0f} s", flush=True)
        return "done"
    if "received: checkpoint" in text or code in (130, 143, -2, -15):
        # The run was stopped by a signal and checkpointed; carrying on would tabulate a half-done benchmark.
        raise KeyboardInterrupt
    if "non-finite" in text:
        # A divergence is a result (the lr is too high), not a glitch: keep it, do not retry on resume.
        diverged_marker(spec, args).write_text(text[-2000:])
        print(f"  {spec.corpus}/{spec.name}: diverged after {seconds:.0f} s", flush=True)
        return "diverged"
    print(f"  {spec.corpus}/{spec.name}: FAILED (exit {code}), see {log}", flush=True)
    args.failed.add(directory)
    return "failed"


def check_settings(specs: list[Spec], args: argparse.Namespace) -> None:
    """Refuse to mix runs made with other settings (steps, preset, --set, …) into these tables."""
    refuse_other_settings([(run_dir(spec, args), why) for spec in specs if (why := settings_mismatch(spec, args))],
                          args.out)


def run_all(specs: list[Spec], args: argparse.Namespace) -> None:
    check_settings(specs, args)
    todo = [s for s in specs if not (run_dir(s, args) / "summary.json").is_file()
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
    """summary.json plus the eval curve against tokens and against training seconds; None if not run.

    Training seconds at an evaluation: the sum, over the logged windows before it, of the window's tokens
    divided by its tokens/s (evaluation time excluded, as in the run's own tokens/s).
    """
    directory = run_dir(spec, args)
    if (directory / "summary.json").is_file():
        summary = json.loads((directory / "summary.json").read_text())
        curve, seconds, last_tokens = [], 0.0, 0
        for line in (directory / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("tokens_per_s"):
                seconds += (record["tokens"] - last_tokens) / record["tokens_per_s"]
                last_tokens = record["tokens"]
            if "val_ppl" in record:  # null: a perplexity that overflowed (poetlm writes standard JSON)
                curve.append((record["tokens"], seconds, math.inf if record["val_ppl"] is None else record["val_ppl"]))
        return {**summary, "curve": curve, "train_seconds": seconds}
    if diverged_marker(spec, args).is_file():
        return {"diverged": True}
    return None


def final_ppl(result: dict | None) -> float:
    if result is None:
        return math.nan
    return math.inf if result.get("diverged") or result["final_val_ppl"] is None else result["final_val_ppl"]


def best_lr(method: Method, lrs: list[float], seed: int, corpus: str, args: argparse.Namespace) -> float | None:
    scored = [(final_ppl(load(Spec(method, lr, seed, corpus), args)), lr) for lr in lrs]
    scored = [(ppl, lr) for ppl, lr in scored if math.isfinite(ppl)]
    return min(scored)[1] if scored else None


def beyond_edge(lrs: list[float], best: float | None) -> float | None:
    """The next lr past the grid end that won, at the grid's own spacing; None if the best is inside.
    `lrs`: the lrs that have a result (a failed run is no grid end)."""
    grid = sorted(lrs)
    if best is None or len(grid) < 2 or grid[0] < best < grid[-1]:
        return None
    ratio = grid[-1] / grid[-2] if best == grid[-1] else grid[0] / grid[1]
    # 1e-2 * (1e-2/3e-3) = 0.0333… -> 0.03, keeping run names readable, with more digits where that rounding
    # would land back on the grid (0.012 * 1.2 -> 0.01).
    return next((lr for lr in (float(f"{best * ratio:.{digits}g}") for digits in (1, 2, 3)) if lr not in grid), best * ratio)


def extend_grids(args: argparse.Namespace, lrs: dict[str, list[float]], corpus: str) -> None:
    """A best lr at the end of a grid is only a bound; try one step further, for every method alike."""
    seed = args.seeds[0]
    for _ in range(args.extend):
        new = {}
        for key in args.methods:
            measured = [lr for lr in lrs[key] if load(Spec(ALL_METHODS[key], lr, seed, corpus), args) is not None]
            lr = beyond_edge(measured, best_lr(ALL_METHODS[key], lrs[key], seed, corpus, args))
            if lr is not None and lr not in lrs[key]:
                if args.report_only and load(Spec(ALL_METHODS[key], lr, seed, corpus), args) is None:
                    continue
                new[key] = lr
        if not new:
            return
        print(f"{corpus}: best lr at a grid end, extending: {', '.join(f'{k} {lr:g}' for k, lr in new.items())}", flush=True)
        for key, lr in new.items():
            lrs[key] = sorted(lrs[key] + [lr])
        if not args.report_only:
            run_all([Spec(ALL_METHODS[k], lr, seed, corpus) for k, lr in new.items()], args)


def fmt_ppl(values: list[float]) -> str:
    if not values:
        return "—"
    if any(v == math.inf for v in values):
        return "diverged"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def at_seconds(curve: list[tuple[int, float, float]], seconds: float) -> float:
    """Validation perplexity at `seconds` of training, interpolated in log-ppl between evaluations."""
    points = [(s, p) for _, s, p in curve]
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if s0 <= seconds <= s1:
            w = (seconds - s0) / (s1 - s0) if s1 > s0 else 1.0
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return points[-1][1] if seconds >= points[-1][0] else math.nan


def table(args, corpus: str, lrs: dict[str, list[float]], best: dict[str, float | None]) -> str:
    finals = [load(Spec(ALL_METHODS[k], best[k], s, corpus), args) for k in args.methods if best[k] is not None
              for s in args.seeds]
    budget = min((r["train_seconds"] for r in finals if r and not r.get("diverged")), default=math.nan)
    rows = []
    for key in args.methods:
        method = ALL_METHODS[key]
        for lr in lrs[key]:
            seeds = args.seeds if lr == best[key] else args.seeds[:1]
            done = {s: r for s in seeds if (r := load(Spec(method, lr, s, corpus), args)) is not None}
            values = [final_ppl(r) for r in done.values()]
            finished = [r for r in done.values() if not r.get("diverged")]
            params = finished[0]["block_linear_trainable_params"] if finished else None
            drift = max((r["spectrum_drift"] for r in finished if r.get("spectrum_drift") is not None), default=None)
            timed = [at_seconds(r["curve"], budget) for r in finished]
            failed = [s for s in seeds if run_dir(Spec(method, lr, s, corpus), args) in args.failed]
            per_seed = ", ".join(["div." if final_ppl(r) == math.inf else f"{final_ppl(r):.2f}" for r in done.values()]
                                 + ["failed"] * len(failed))
            final = fmt_ppl(values) if values or not failed else "failed"
            if failed and values:  # a mean over the seeds that finished, said so
                final += f" ({len(failed)} failed)"
            label = ""
            if lr == best[key]:  # one lr is not a sweep; a best at either end of one is only a bound
                label = (" **best** (not swept)" if len(lrs[key]) == 1 else
                         " **best** (at the grid's edge)" if lr in (min(lrs[key]), max(lrs[key])) else " **best**")
            rows.append([method.label + label, f"{method.lr_key}={lr:g}",
                         len(done), final, per_seed or "—", fmt_ppl(timed) if timed else "—",
                         f"{drift:.1e}" if drift is not None else "—",
                         f"{params:,}" if params is not None else "—",
                         f"{statistics.median(r['train_seconds'] for r in finished):.0f}" if finished else "—"])
    # no finished run: no budget; a few seconds' runs (a smoke test) keep their digits: not "at 0 s"
    at = f"val ppl at {budget:.{0 if budget >= 10 else 2}f} s" if math.isfinite(budget) else "val ppl at equal time"
    headers = ["method", "swept lr", "seeds", "final val ppl (mean ± sd)", "per seed", at,
               "spectrum drift (max)", "block-linear params", "train s"]
    return markdown_table(headers, rows, align="llrrrrrrr")


def mean_curve(curves: list[list[tuple]], axis: int) -> tuple[list[float], list[float]]:
    """Mean over seeds of (x, ppl) at the evaluations every seed made (x = tokens or seconds, averaged)."""
    n = min(len(c) for c in curves)
    return ([statistics.fmean(c[i][axis] for c in curves) for i in range(n)],
            [statistics.fmean(c[i][2] for c in curves) for i in range(n)])


def _axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # the object API on an Agg canvas: headless, no pyplot global state
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def plot_curves(args, corpus: str, best, path: Path, axis: int) -> None:
    xlabel = "training tokens" if axis == 0 else "training seconds (1 CPU thread, evaluation excluded)"
    what = "tokens" if axis == 0 else "time"
    fig, ax = _axes(f"{args.corpus_dirs[corpus]}: validation perplexity at equal {what} ({args.preset}, {args.steps} steps)",
                    xlabel, "validation perplexity (mean over seeds)")
    if axis == 0:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1e6:g}M"))
    for key in args.methods:
        if best[key] is None:
            continue
        method = ALL_METHODS[key]
        runs = [load(Spec(method, best[key], s, corpus), args) for s in args.seeds]
        curves = [r["curve"] for r in runs if r and r.get("curve")]
        if not curves:
            continue
        x, ppl = mean_curve(curves, axis)
        ax.plot(x, ppl, marker="o", markersize=3,
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    print(f"wrote {path}")


def plot_lr(args, corpus: str, lrs, path: Path) -> None:
    fig, ax = _axes(f"{args.corpus_dirs[corpus]}: lr sweep, seed {args.seeds[0]} ({args.preset}, {args.steps} steps)",
                    "swept learning rate (each method's block-matrix lr)", "final validation perplexity")
    for key in args.methods:
        method = ALL_METHODS[key]
        points = [(lr, final_ppl(load(Spec(method, lr, args.seeds[0], corpus), args))) for lr in lrs[key]]
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
    print(describe_machine(args.device), flush=True)
    start = time.perf_counter()
    lrs = {c: {key: list(getattr(args, lrs_option(key))) for key in args.methods} for c in args.corpora}
    check_settings([Spec(ALL_METHODS[k], lr, seed, c) for c in args.corpora for k in args.methods for lr in lrs[c][k]
                    for seed in args.seeds], args)
    if not args.report_only:  # every corpus's sweep first, so two jobs always have work
        print(f"phase 1: lr sweeps, seed {args.seeds[0]}", flush=True)
        run_all([Spec(ALL_METHODS[k], lr, args.seeds[0], c) for c in args.corpora for k in args.methods
                 for lr in lrs[c][k]], args)
    best = {}
    for corpus in args.corpora:
        extend_grids(args, lrs[corpus], corpus)
        best[corpus] = {k: best_lr(ALL_METHODS[k], lrs[corpus][k], args.seeds[0], corpus, args) for k in args.methods}
    if not args.report_only and len(args.seeds) > 1:
        print(f"phase 2: seeds {args.seeds[1:]} at each method's best lr", flush=True)
        run_all([Spec(ALL_METHODS[k], best[c][k], s, c) for c in args.corpora for k in args.methods
                 if best[c][k] is not None for s in args.seeds[1:]], args)
    report = []
    for corpus in args.corpora:
        stem = args.corpus_dirs[corpus]
        report.append(f"### {stem}: {args.preset}, {args.steps} steps (best lr chosen on seed {args.seeds[0]}; "
                      f"sd over seeds {args.seeds})\n\n{table(args, corpus, lrs[corpus], best[corpus])}\n")
        prefix = "ablation" if args.ablation else "quality"
        plot_curves(args, corpus, best[corpus], args.img / f"{prefix}_{stem}_tokens.png", axis=0)
        plot_curves(args, corpus, best[corpus], args.img / f"{prefix}_{stem}_time.png", axis=1)
        if not args.ablation:
            plot_lr(args, corpus, lrs[corpus], args.img / f"{prefix}_{stem}_lr.png")
    text = "\n".join(report)
    print("\n" + text)
    path = args.out / ("ablation.md" if args.ablation else "quality.md")
    if any(load(Spec(ALL_METHODS[k], lr, s, c), args) for c in args.corpora for k in args.methods for lr in lrs[c][k]
           for s in args.seeds):
        path.write_text(text)
    else:  # never replace a published table with an empty one
        print(f"no run has a result, {path} left as it was")
    if hasattr(os, "getloadavg"):
        print(f"\nload average after the run: {os.getloadavg()[0]:.2f}; wall time {time.perf_counter() - start:.0f} s")
    if args.failed:
        logs = ", ".join(f"{d.parent / d.name}.log" for d in sorted(args.failed)[:4])
        raise SystemExit(f"{len(args.failed)} run(s) failed (marked in the table), see {logs}")


if __name__ == "__main__":
    main()
