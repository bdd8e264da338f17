"""Adaptation against forgetting: POET, POET-paper, LoRA and full finetuning, each over a learning-rate sweep.

    python benchmarks/finetune_sweep.py                 # the run in docs/finetuning.md (~25 min on 2 CPU cores)
    python benchmarks/finetune_sweep.py --report-only   # table and plot from the runs already there

1. The base: the `tiny` preset pretrained with AdamW on sotu (1000 steps), exported as a plain HF model.
2. Each method finetunes the base on shakespeare (the `finetune` preset: 200 steps of 16 × 128 tokens) at
   every lr of its grid. POET and POET-paper train only rotations of the block linears (init="keep"),
   LoRA only its r=8 adapters, full finetuning (AdamW) every weight.
3. Every finetuned model is scored on the shakespeare validation split (adaptation: the run's own final
   perplexity) and on the sotu validation split it was pretrained on (forgetting), with the same windows.
Runs are `poetlm` subprocesses under --out; finished steps are skipped, so rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from common import describe_machine, markdown_table

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
    return parser.parse_args(argv)


def poetlm(args, log: Path, *command: str) -> None:
    """Run one poetlm command unless its log says it finished; output to `log`."""
    done = log.with_suffix(".done")
    if done.exists() or args.report_only:
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with log.open("w") as stream:
        code = subprocess.run([sys.executable, "-m", "poetlm", *command], stdout=stream, stderr=subprocess.STDOUT,
                              env=env, cwd=args.out).returncode
    if code != 0:
        raise SystemExit(f"poetlm {' '.join(command)} failed, see {log}")
    done.write_text("")


def sotu_ppl(args, name: str, path: str) -> float | None:
    log = args.out / "logs" / f"eval-{name}.log"
    poetlm(args, log, "eval", path, "--data", "sotu", "--tokens", str(args.eval_tokens), "--seq-len", "128")
    match = re.search(r"perplexity: ([0-9.]+)", log.read_text()) if log.exists() else None
    return float(match.group(1)) if match else None


def finetune(args, method: str, lr: float) -> dict | None:
    key, _ = GRIDS[method]
    name = f"{method}-lr{lr:g}"
    run = args.out / "runs" / name
    if run.exists() and not (run / "summary.json").exists():
        import shutil

        shutil.rmtree(run)  # an interrupted run: start it again rather than end up with NAME-2
    poetlm(args, args.out / "logs" / f"{name}.log", "finetune", "--model", str(args.out / "base"), "--data", "shakespeare",
           "--method", method, "--name", name, "--out", "runs", "--steps", str(args.steps), "--no-progress",
           f"{key}={lr!r}", f"eval_tokens={args.eval_tokens}")
    if not (run / "summary.json").exists():
        return None
    summary = json.loads((run / "summary.json").read_text())
    return {**summary, "sotu_ppl": sotu_ppl(args, name, f"runs/{name}")}


def main(argv=None) -> None:
    args = parse_args(argv)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    print(describe_machine("cpu"), flush=True)
    base_run = args.base_run.resolve() if args.base_run else "runs/base-adamw"
    if not args.base_run:
        poetlm(args, args.out / "logs" / "pretrain.log", "train", "--method", "adamw", "--name", "base-adamw", "--out",
               "runs", "--no-progress", "--steps", str(args.pretrain_steps), "optim.lr=3e-3")
    poetlm(args, args.out / "logs" / "export.log", "export", str(base_run), "base")
    base_sotu = sotu_ppl(args, "base", "base")
    jobs = [(m, lr) for m in args.methods for lr in GRIDS[m][1]]
    if args.jobs > 1 and not args.report_only:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:  # runs first; the sotu evaluations below are quick
            list(pool.map(lambda job: finetune(args, *job), jobs))
    results = {job: finetune(args, *job) for job in jobs}
    rows, base_target = [], None
    for (method, lr), r in results.items():
        if r is None:
            rows.append([LABELS[method], f"{GRIDS[method][0]}={lr:g}", "—", "—", "—", "—"])
            continue
        base_target = r["initial_val_ppl"]
        drift = r.get("spectrum_drift")
        rows.append([LABELS[method], f"{GRIDS[method][0]}={lr:g}", f"{r['final_val_ppl']:.2f}", f"{r['sotu_ppl']:.2f}",
                     f"{r['block_linear_trainable_params']:,}", f"{drift:.1e}" if drift is not None else "—"])
    print(f"\nbase ({base_run}): shakespeare {base_target} · sotu {base_sotu}\n")
    text = markdown_table(["method", "lr", "shakespeare val ppl (adaptation)", "sotu val ppl (forgetting)",
                           "block-linear trainable params", "spectrum drift"], rows, align="llrrrr")
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    plot(args, results, base_target, base_sotu)


def plot(args, results, base_target, base_sotu) -> None:
    fig = Figure(figsize=(7, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(f"finetuning sotu → shakespeare, {args.steps} steps: adaptation vs forgetting")
    ax.set_xlabel("shakespeare validation perplexity (lower = adapted more)")
    ax.set_ylabel("sotu validation perplexity (lower = forgot less)")
    for method in args.methods:
        points = [(r["final_val_ppl"], r["sotu_ppl"], lr) for (m, lr), r in results.items() if m == method and r]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=LABELS[method])
        for x, y, lr in points:
            ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if base_target and base_sotu and math.isfinite(base_sotu):
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
