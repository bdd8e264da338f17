"""Adaptation against forgetting: POET, POET-paper, LoRA and full finetuning, each over a learning-rate sweep.

    python benchmarks/finetune_sweep.py                 # the run in docs/finetuning.md (~25 min on 2 CPU cores)
    python benchmarks/finetune_sweep.py --report-only   # table and plot from the runs already there

1. The base: the `tiny` preset pretrained with AdamW on sotu (1000 steps), exported as a plain HF model.
2. Each method finetunes the base on shakespeare (the `finetune` preset: 200 steps of 16 × 128 tokens) at
   every lr of its grid. POET and POET-paper train only rotations of the block linears (init="keep"),
   LoRA only its r=8 adapters, full finetuning (AdamW) every weight.
3. Every finetuned model is scored on the shakespeare validation split (adaptation: the run's own final
   perplexity) and on the sotu validation split it was pretrained on (forgetting), with the same windows.
Runs are `poetlm` subprocesses under --out; finished steps (and diverged runs) are skipped, so rerunning resumes;
a step finished with other settings (--steps, --pretrain-steps, --eval-tokens, --base-run) is refused, not
relabelled. A failed run is marked in the table, the others go on, and the script exits nonzero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from common import describe_machine, markdown_table, refuse_other_settings, setting_differences

REPO = Path(__file__).resolve().parent.parent
GRIDS = {  # the swept lr of each method: POET's is radians per step, the others are Adam learning rates
    "poet": ("optim.lr_poet", (0.003, 0.01, 0.03)),
    "poet-paper": ("optim.lr_poet", (1e-3, 3e-3, 1e-2)),
    "lora": ("optim.lr", (3e-4, 1e-3, 3e-3)),
    "adamw": ("optim.lr", (3e-5, 1e-4, 3e-4)),
}
LABELS = {"poet": "POET (default)", "poet-paper": "POET-paper", "lora": "LoRA r=8", "adamw": "full (AdamW)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/poetlm-finetune"))
    parser.add_argument("--methods", nargs="+", choices=list(GRIDS), default=list(GRIDS))
    parser.add_argument("--steps", type=int, default=200, help="finetuning steps (default: the finetune preset's 200)")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--base-run", type=Path, help="use this finished run directory as the base instead of "
                        "pretraining one (e.g. quality.py's sotu/adamw-lr0.003-s0)")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "finetune_tradeoff.png")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    # The poetlm subprocesses run in --out: a path relative to the caller would name another file there.
    args.out, args.plot = args.out.resolve(), args.plot.resolve()
    args.base_run = args.base_run.resolve() if args.base_run else None
    return args


@dataclass(frozen=True)
class Step:
    """One poetlm command, its log, and the settings its result depends on (kept with its finished marker)."""
    log: Path
    command: tuple[str, ...]
    settings: dict

    @property
    def marker(self) -> Path:
        return self.log.with_suffix(".done")


def base_settings(args) -> dict:
    """What the base model is: every later step's result depends on it."""
    return {"base_run": str(args.base_run)} if args.base_run else {"pretrain_steps": args.pretrain_steps}


def base_path(args) -> str:
    return str(args.base_run) if args.base_run else "runs/base-adamw"


def pretrain_step(args) -> Step:
    return Step(args.out / "logs" / "pretrain.log",
                ("train", "--method", "adamw", "--name", "base-adamw", "--out", "runs", "--no-progress", "--steps",
                 str(args.pretrain_steps), "optim.lr=3e-3"), base_settings(args))


def export_step(args) -> Step:
    return Step(args.out / "logs" / "export.log", ("export", base_path(args), "base"), base_settings(args))


def eval_step(args, name: str, path: str, finetuned: bool) -> Step:
    settings = {**base_settings(args), "eval_tokens": args.eval_tokens, **({"steps": args.steps} if finetuned else {})}
    return Step(args.out / "logs" / f"eval-{name}.log",
                ("eval", path, "--data", "sotu", "--tokens", str(args.eval_tokens), "--seq-len", "128"), settings)


def finetune_step(args, method: str, lr: float) -> Step:
    key, _ = GRIDS[method]
    name = f"{method}-lr{lr:g}"
    return Step(args.out / "logs" / f"{name}.log",
                ("finetune", "--model", str(args.out / "base"), "--data", "shakespeare", "--method", method, "--name",
                 name, "--out", "runs", "--steps", str(args.steps), "--no-progress", f"{key}={lr!r}",
                 f"eval_tokens={args.eval_tokens}"),
                {**base_settings(args), "steps": args.steps, "eval_tokens": args.eval_tokens})


def base_steps(args) -> list[Step]:
    return [export_step(args)] if args.base_run else [pretrain_step(args), export_step(args)]


def all_steps(args, jobs) -> list[Step]:
    steps = [*base_steps(args), eval_step(args, "base", "base", finetuned=False)]
    for method, lr in jobs:
        steps += [finetune_step(args, method, lr), eval_step(args, f"{method}-lr{lr:g}", f"runs/{method}-lr{lr:g}", True)]
    return steps


def settings_mismatch(step: Step) -> str | None:
    """Why the finished step in --out was made with other settings (None: it was not, or is not finished)."""
    if not step.marker.exists():
        return None
    try:
        saved = json.loads(step.marker.read_text())["settings"]
    except (ValueError, KeyError, TypeError):
        return "no settings recorded"
    differ = setting_differences(step.settings, saved)
    return f"{', '.join(differ)} differ" if differ else None


def poetlm(args, step: Step) -> str | None:
    """Run one poetlm command unless it finished with these settings: "done", "diverged" (kept: a result, not
    retried), "failed" (retried when rerun), or None (not run: --report-only)."""
    if step.marker.exists():
        return json.loads(step.marker.read_text())["outcome"]
    if args.report_only:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with step.log.open("w") as stream:
        code = subprocess.run([sys.executable, "-m", "poetlm", *step.command], stdout=stream, stderr=subprocess.STDOUT,
                              env=env, cwd=args.out).returncode
    if code == 0:
        outcome = "done"
    elif "non-finite" in step.log.read_text():
        outcome = "diverged"
    else:
        print(f"poetlm {step.command[0]} failed (exit {code}), see {step.log}", flush=True)
        return "failed"
    step.marker.write_text(json.dumps({"settings": step.settings, "outcome": outcome}))
    return outcome


def sotu_ppl(args, name: str, path: str, finetuned: bool = True) -> float | str | None:
    """The sotu perplexity, "failed", or None (not run)."""
    step = eval_step(args, name, path, finetuned)
    outcome = poetlm(args, step)
    if outcome != "done":
        return outcome and "failed"  # an evaluation has no divergence: anything but done is a failure
    return float(re.search(r"perplexity: ([0-9.]+)", step.log.read_text()).group(1))


def run_finetune(args, method: str, lr: float) -> str | None:
    run = args.out / "runs" / f"{method}-lr{lr:g}"
    step = finetune_step(args, method, lr)
    if run.exists() and not step.marker.exists() and not args.report_only:
        shutil.rmtree(run)  # an interrupted or failed run: start it again rather than end up with NAME-2
    return poetlm(args, step)


def result(args, method: str, lr: float, outcome: str | None) -> dict | str | None:
    """The finetuned run's summary with its sotu perplexity; or its outcome: "diverged", "failed", None."""
    if outcome != "done":
        return outcome
    name = f"{method}-lr{lr:g}"
    summary = json.loads((args.out / "runs" / name / "summary.json").read_text())
    if summary["final_val_ppl"] is None:  # overflowed: poetlm writes it as null
        return "diverged"
    return {**summary, "sotu_ppl": sotu_ppl(args, name, f"runs/{name}")}


def main(argv=None) -> None:
    args = parse_args(argv)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    print(describe_machine("cpu"), flush=True)
    jobs = [(m, lr) for m in args.methods for lr in GRIDS[m][1]]
    refuse_other_settings([(step.marker, why) for step in all_steps(args, jobs) if (why := settings_mismatch(step))],
                          args.out)
    for step in base_steps(args):  # nothing else can run without the base
        if poetlm(args, step) not in ("done", None):
            raise SystemExit(f"poetlm {' '.join(step.command)} did not finish, see {step.log}")
    base_sotu = sotu_ppl(args, "base", "base", finetuned=False)
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:  # runs first; the sotu evaluations below are quick
            outcomes = list(pool.map(lambda job: run_finetune(args, *job), jobs))
    else:
        outcomes = [run_finetune(args, *job) for job in jobs]
    results = {job: result(args, *job, outcome) for job, outcome in zip(jobs, outcomes)}
    rows, base_target = [], None
    for (method, lr), r in results.items():
        if not isinstance(r, dict):
            rows.append([LABELS[method], f"{GRIDS[method][0]}={lr:g}", r or "—", "—", "—", "—"])
            continue
        base_target = r["initial_val_ppl"]
        drift, sotu = r.get("spectrum_drift"), r["sotu_ppl"]
        rows.append([LABELS[method], f"{GRIDS[method][0]}={lr:g}", f"{r['final_val_ppl']:.2f}",
                     f"{sotu:.2f}" if isinstance(sotu, float) else sotu or "—",
                     f"{r['block_linear_trainable_params']:,}", f"{drift:.1e}" if drift is not None else "—"])
    print(f"\nbase ({base_path(args)}): shakespeare {base_target} · sotu {base_sotu}\n")
    text = markdown_table(["method", "lr", "shakespeare val ppl (adaptation)", "sotu val ppl (forgetting)",
                           "block-linear trainable params", "spectrum drift"], rows, align="llrrrr")
    print(text)
    if base_target is not None:  # never replace a table of results with one of none
        (args.out / "results.md").write_text(text + "\n")
    plot(args, results, base_target, base_sotu)
    failed = [f"{m}-lr{lr:g}" for (m, lr), r in results.items()
              if r == "failed" or isinstance(r, dict) and r["sotu_ppl"] == "failed"] + ["base"] * (base_sotu == "failed")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (marked in the table): {', '.join(failed)}; see {args.out / 'logs'}")


def plot(args, results, base_target, base_sotu) -> None:
    fig = Figure(figsize=(7, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(f"finetuning sotu → shakespeare, {args.steps} steps: adaptation vs forgetting")
    ax.set_xlabel("shakespeare validation perplexity (lower = adapted more)")
    ax.set_ylabel("sotu validation perplexity (lower = forgot less)")
    for method in args.methods:
        points = [(r["final_val_ppl"], r["sotu_ppl"], lr) for (m, lr), r in results.items()
                  if m == method and isinstance(r, dict) and isinstance(r["sotu_ppl"], float)]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=LABELS[method])
        for x, y, lr in points:
            ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if base_target and isinstance(base_sotu, float) and math.isfinite(base_sotu):
        ax.scatter([base_target], [base_sotu], marker="*", s=120, color="black", label="base (no finetuning)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # 150, not 1.5×10²
        axis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if not ax.lines:
        print(f"nothing to plot, {args.plot} left as it was")
        return
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, format="png")
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
