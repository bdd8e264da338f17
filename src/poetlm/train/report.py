"""Compare finished (or interrupted) training runs: a markdown table plus plots.

Reads the files the training loop leaves in a run directory (config.json,
metrics.jsonl, summary.json, spectrum.json) and writes report.md with PNGs
next to it.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The object API with an explicit Agg canvas never touches pyplot's global
# figure registry, so reports work headless and cannot leak open figures.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import is_run_dir
from .config import make_dir
from .metrics import format_ppl


class ReportError(ValueError):
    """A run directory is missing or its files cannot be read."""


@dataclass
class Run:
    path: Path
    name: str
    method: str
    label: str
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    spectrum: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # data.json: which tokens the run trained and was scored on

    @property
    def incomplete(self) -> bool:
        return self.summary is None


def method_label(config: dict[str, Any]) -> str:
    method = str(config.get("method", "unknown")).lower()
    if method in ("poet", "poet-paper"):
        poet = config.get("poet") or {}
        variant = str(poet.get("variant", "")).lower()
        name = "POET-paper" if method == "poet-paper" else "POET"
        if variant == "bs" and "block_size" in poet:
            return f"{name}-BS b={poet['block_size']}"
        if variant == "fs" and "fraction" in poet:
            return f"{name}-FS β={poet['fraction']}"
        return f"{name}-{variant.upper()}" if variant else name
    return {"adamw": "AdamW", "muon": "Muon"}.get(method, method)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


# The metrics the report computes with: a record that holds anything but a number (or null) in one is damaged.
_NUMERIC = ("step", "tokens", "loss", "val_loss", "val_ppl", "tokens_per_s", "peak_mem_mb", "spectrum_drift", "probe_cos")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _warn(message: str) -> None:
    print(f"poetlm: warning: {message}", file=sys.stderr)


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Train and eval records; unreadable lines (a kill mid-write, damaged bytes) and records with a non-numeric
    metric (an edited file) are dropped with a warning."""
    train, evals, unreadable, non_numeric = [], [], [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:  # UnicodeDecodeError and JSONDecodeError included
            unreadable.append(number)
            continue
        if any(record.get(key) is not None and not _is_number(record[key]) for key in _NUMERIC):
            non_numeric.append(number)
        elif "loss" in record:
            train.append(record)
        elif "val_loss" in record or "val_ppl" in record:
            evals.append(record)
    for numbers, what in ((unreadable, f"unreadable line(s) of {path}"), (non_numeric, f"line(s) of {path} with a non-numeric metric")):
        if numbers:
            shown = ", ".join(map(str, numbers[:10])) + (" …" if len(numbers) > 10 else "")
            _warn(f"skipped {len(numbers)} {what} (line {shown})")
    return train, evals


def _read_spectrum(path: Path) -> dict[str, Any] | None:
    """spectrum.json; None, with a warning, when it is damaged: it feeds one plot, which is no reason to fail the report."""
    try:
        spectrum = _read_json(path)
    except ReportError as error:
        problem = str(error)
    else:
        if spectrum is None or all(spectrum.get(key) is None or (isinstance(spectrum[key], list) and all(map(_is_number, spectrum[key])))
                                   for key in ("initial", "final")):
            return spectrum
        problem = f'{path}: "initial" and "final" must be lists of numbers'
    _warn(f"{problem}; the spectrum plot leaves this run out")
    return None


def _is_run(path: Path) -> bool:
    """A run directory, with metrics or before its first log line (a directory of metrics alone: a copied run)."""
    return (path / "metrics.jsonl").is_file() or is_run_dir(path)


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory does not exist: {run_dir}")
    metrics = run_dir / "metrics.jsonl"
    if not _is_run(run_dir):
        raise ReportError(f"not a poetlm run directory: {run_dir} (no metrics.jsonl)")

    config = _read_json(run_dir / "config.json") or {}
    summary = _read_json(run_dir / "summary.json")
    if "method" not in config and summary and "method" in summary:
        config = {**config, "method": summary["method"]}
    train, evals = _read_metrics(metrics) if metrics.is_file() else ([], [])  # a run before its first log line
    return Run(
        path=run_dir,
        name=str(config.get("name") or run_dir.resolve().name),
        method=str(config.get("method", "unknown")).lower(),
        label=method_label(config),
        config=config,
        train=train,
        eval=evals,
        summary=summary,
        spectrum=_read_spectrum(run_dir / "spectrum.json"),
        data=_read_data_record(run_dir / "data.json"),
    )


def _read_data_record(path: Path) -> dict[str, Any] | None:
    """data.json, or None where it is missing or damaged: it only backs the comparability note."""
    try:
        return _read_json(path)
    except ReportError:
        return None


# ---------------------------------------------------------------- table


def format_count(n: float | None) -> str:
    if n is None:
        return "—"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ppl(value: float | None) -> str:
    return "—" if value is None else format_ppl(value)


def _last(records: list[dict], key: str) -> float | None:
    """The latest record's value of `key`; inf where it was written as null (`standard_json`: it overflowed)."""
    values = [r[key] for r in records if key in r]
    return None if not values else math.inf if values[-1] is None else values[-1]


def run_stats(run: Run) -> dict[str, float | None]:
    """Final numbers for the table: summary.json if present, else from metrics."""
    s = run.summary or {}
    speeds = [r["tokens_per_s"] for r in run.train if r.get("tokens_per_s") is not None]
    mems = [r["peak_mem_mb"] for r in run.train if r.get("peak_mem_mb") is not None]
    tokens = [r["tokens"] for r in run.train + run.eval if r.get("tokens") is not None]
    derived = {
        "block_linear_trainable_params": None,
        "initial_val_ppl": next((r["val_ppl"] for r in run.eval if r.get("step") == 0 and "val_ppl" in r), None),
        "final_val_ppl": _last(run.eval, "val_ppl"),
        # Median, because the first steps include compilation and warm-up.
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_mem_mb": max(mems) if mems else None,
        "total_tokens": max(tokens) if tokens else None,
        "spectrum_drift": _last(run.train, "spectrum_drift"),
    }
    stats = {k: s[k] if _is_number(s.get(k)) else v for k, v in derived.items()}  # a damaged value as a missing one
    if "final_val_ppl" in s and s["final_val_ppl"] is None:  # a finished run writes null only for an overflow
        stats["final_val_ppl"] = math.inf
    return stats


def _table(runs: list[Run]) -> list[str]:
    stats = [run_stats(run) for run in runs]
    finetunes = any(st["initial_val_ppl"] is not None for st in stats)  # the base model's perplexity, before step 1
    rows = [
        "| Run | Method | Trainable params (block linears) | " + ("Initial val ppl | " if finetunes else "")
        + "Final val ppl | Tokens/s | Peak mem (MB) | Tokens | Spectrum drift |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if finetunes else ""),
    ]
    for run, st in zip(runs, stats):
        name = run.name.replace("|", "\\|") + (" (incomplete)" if run.incomplete else "")
        cells = [
            name,
            run.label,
            format_count(st["block_linear_trainable_params"]),
            *([_ppl(st["initial_val_ppl"])] if finetunes else []),
            _ppl(st["final_val_ppl"]),
            _fmt(st["tokens_per_s"], ",.0f"),
            _fmt(st["peak_mem_mb"], ",.0f"),
            format_count(st["total_tokens"]),
            _fmt(st["spectrum_drift"], ".1e"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


# ---------------------------------------------------------------- plots


def _new_axes(title: str, ylabel: str, xlabel: str = "tokens"):
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax, path: Path) -> Path:
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _series(records: list[dict], key: str, ceiling: float | None = None) -> tuple[list, list]:
    """(tokens, values) of the records that have `key`; with a `ceiling`, values above it and overflowed ones
    (null) are drawn at it."""
    if ceiling is None:
        pts = [(r["tokens"], r[key]) for r in records if r.get("tokens") is not None and r.get(key) is not None]
    else:
        pts = [(r["tokens"], ceiling if r[key] is None else min(r[key], ceiling)) for r in records
               if r.get("tokens") is not None and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _legend_name(run: Run) -> str:
    return f"{run.name} ({run.label})"


def _plot_loss(runs: list[Run], path: Path) -> Path | None:
    fig, ax = _new_axes("Loss", "loss")
    drawn, values = False, []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        x, y = _series(run.train, "loss")
        if x:  # a marker too: a run with one logged step has no line to draw
            ax.plot(x, y, color=color, linewidth=0.8, alpha=0.7, marker="." if len(x) == 1 else None,
                    label=f"{_legend_name(run)} train")
        vx, vy = _series(run.eval, "val_loss")
        if vx:
            ax.plot(vx, vy, color=color, marker="o", linestyle="none",
                    label=f"{_legend_name(run)} val")
        drawn = drawn or bool(x or vx)
        values += y + vy
    if not drawn:
        return None
    # Losses spanning more than 10× (a diverged run's hundreds) would flatten the others into a line at the bottom.
    if min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    return _save(fig, ax, path)


def _plot_metric(runs: list[Run], path: Path, *, eval_records: bool, key: str, title: str, log: bool,
                 ceiling: float | None = None, **style) -> Path | None:
    """One line per run of `key` against tokens (a marker for a run with one point, which has no line); None
    (nothing written) if no run has it."""
    fig, ax = _new_axes(title, key.replace("_", " "))
    drawn = False
    for i, run in enumerate(runs):
        x, y = _series(run.eval if eval_records else run.train, key, ceiling)
        if x:
            ax.plot(x, y, color=f"C{i % 10}", label=_legend_name(run), **{"marker": "o" if len(x) == 1 else None, **style})
            drawn = True
    if not drawn:
        return None
    if log:
        ax.set_yscale("log")
    return _save(fig, ax, path)


# A diverged run's perplexity reaches 1e300 and inf; matplotlib's log axis overflows near float's limit.
PPL_CEILING = 1e30


def _plot_val_ppl(runs: list[Run], path: Path) -> Path | None:
    title = "Validation perplexity"
    if any(r["val_ppl"] is None or r["val_ppl"] > PPL_CEILING for run in runs for r in run.eval if "val_ppl" in r):
        title += f" (values above {PPL_CEILING:.0e} drawn at it)"
    return _plot_metric(runs, path, eval_records=True, key="val_ppl", title=title, log=True, ceiling=PPL_CEILING, marker="o")


def _plot_spectrum(runs: list[Run], path: Path) -> Path | None:
    with_spectrum = [(i, r) for i, r in enumerate(runs) if r.spectrum]
    if not with_spectrum:
        return None
    layers = sorted({str(r.spectrum.get("layer", "?")) for _, r in with_spectrum})
    fig, ax = _new_axes(f"Singular values: {', '.join(layers)}", "σ", "index")
    positive = True
    for i, run in with_spectrum:
        color = f"C{i % 10}"
        for key, style in (("initial", "--"), ("final", "-")):
            values = run.spectrum.get(key) or []
            if values:
                ax.plot(range(len(values)), values, color=color, linestyle=style,
                        label=f"{_legend_name(run)} {key}")
                positive = positive and min(values) > 0
    # Spectra span orders of magnitude; log scale only works if all σ > 0.
    if positive:
        ax.set_yscale("log")
    return _save(fig, ax, path)


def _plot_probe_cos(runs: list[Run], path: Path) -> Path | None:
    return _plot_metric(runs, path, eval_records=False, key="probe_cos", title="POET probe cosine", log=False, linewidth=0.8)


PLOTS = (
    ("loss.png", "Train and validation loss", _plot_loss),
    ("val_ppl.png", "Validation perplexity", _plot_val_ppl),
    ("spectrum.png", "Singular values, initial (dashed) vs final (solid)", _plot_spectrum),
    ("probe_cos.png", "POET probe cosine", _plot_probe_cos),
)


def _distinct(run_dirs: list[Path]) -> list[Path]:
    """The run directories, each once: a run named twice (`report A A`, or `A` and `./A`) would be two equal rows."""
    seen: dict[Path, Path] = {}
    for run_dir in map(Path, run_dirs):
        first = seen.setdefault(run_dir.resolve(), run_dir)
        if first is not run_dir:
            _warn(f"{run_dir} is the run {first} given again; it is reported once")
    return list(seen.values())


# What a validation perplexity is measured on: runs that differ in one of these score other tokens, or count
# them in another vocabulary.
_MEASURED_ON = ("data.data", "data.tokenizer", "data.vocab_size", "data.seq_len", "data.val_fraction", "data.split",
                "eval_tokens", "finetune.base_model")


def _measure_setting(config: dict, key: str):
    if key == "data.split":  # data.split_seed, which follows the run's seed when unset
        data = config.get("data") or {}
        return data.get("split_seed") if data.get("split_seed") is not None else config.get("seed")
    if key == "data.vocab_size" and (config.get("data") or {}).get("tokenizer") is not None:
        return None  # the given tokenizer's vocabulary, which data.tokenizer names
    section, _, name = key.rpartition(".")
    value = (config.get(section) or {}).get(name) if section else config.get(name)
    if isinstance(value, str) and Path(value).expanduser().exists():  # one file however it was spelled
        return str(Path(value).expanduser().resolve())
    return value


def _incomparable(runs: list[Run]) -> list[str]:
    """The settings, with their values, in which the runs' validation sets differ (runs whose config.json
    lacks them, e.g. hand-made ones, are left out of the comparison); where no setting does, the validation
    tokens or tokenizer that data.json records (another data.max_documents, an edited data file)."""
    differing = []
    for key in _MEASURED_ON:
        shown = list(dict.fromkeys(repr(_measure_setting(run.config, key)) for run in runs if run.config.get("data")))
        if len(shown) > 1:
            differing.append(f"{'the data split seed' if key == 'data.split' else key}: {', '.join(shown[:4])}")
    for key, what in (("sha256_val", "the validation tokens"), ("tokenizer_hash", "the tokenizer")):
        recorded = {run.data.get(key) for run in runs if run.data and run.data.get(key)}
        if not differing and len(recorded) > 1:
            differing.append(f"{what} (data.json's {key}, e.g. another data.max_documents or an edited data file)")
    return differing


def _told_apart(runs: list[Run]) -> list[Run]:
    """Runs of one name (copies, or one name in several out_dirs) named with their directory too: identical
    rows and legend entries could not be told apart."""
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} [{run.path}]"
    return runs


def _refuse_other_run(out_dir: Path, runs: list[Run]) -> None:
    """A run directory's report.md and plots are that run's own: only a report of that run alone may replace them."""
    if not _is_run(out_dir):
        return
    if len(runs) == 1 and runs[0].path.resolve() == out_dir.resolve():
        return
    raise ReportError(f"--out {out_dir} is a run directory, whose report.md is that run's own report: "
                      "write a comparison to another directory (e.g. --out report)")


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = _told_apart([load_run(d) for d in _distinct(run_dirs)])  # fail before writing anything
    out_dir = Path(out_dir)
    _refuse_other_run(out_dir, runs)
    make_dir(out_dir, "--out", ReportError)

    lines = ["# Training report", "", *_table(runs), ""]
    differing = _incomparable(runs)
    if differing:
        note = (f"these runs' validation perplexities are not comparable: they were measured on other tokens "
                f"({'; '.join(differing)})")
        _warn(note)
        lines += [f"**Note:** {note}.", ""]
    for filename, caption, plot in PLOTS:
        target = out_dir / filename
        if plot(runs, target):
            lines += [f"## {caption}", "", f"![{caption}]({filename})", ""]
        else:
            # A leftover from an earlier report would no longer match the table.
            target.unlink(missing_ok=True)

    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
