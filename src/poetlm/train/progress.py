"""Progress output of a training run: a tqdm bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns, which a log file, CI or `nohup` records as one ever longer
line; there one line per log interval says the same and reads well.
"""

from __future__ import annotations

from .metrics import format_ppl


class BarProgress:
    """tqdm's bar, advanced every step, with the latest metrics after it."""

    def __init__(self, total: int, start: int, name: str, stream) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, file=stream)
        self.rate = 0.0

    def step(self, record: dict, last_eval: dict | None, logged: bool) -> None:
        self.rate = record.get("tokens_per_s", self.rate)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{self.rate:.0f}",
                             val_ppl=format_ppl(last_eval["val_ppl"]) if last_eval else "-")

    def close(self) -> None:
        self.bar.close()


class LineProgress:
    """One line per logged step: `step 50/1000 | loss 4.123 | lr 1.0e-02 | … | val_ppl 123.4 | drift 2.1e-06`."""

    def __init__(self, total: int, stream) -> None:
        self.total, self.stream = total, stream
        self.drift = None

    def step(self, record: dict, last_eval: dict | None, logged: bool) -> None:
        self.drift = record.get("spectrum_drift", self.drift)  # computed every diagnostics_every steps only
        if not logged:
            return
        parts = [f"step {record['step']}/{self.total}", f"loss {record['loss']:.3f}", f"lr {record['lr']:.1e}"]
        parts += [f"{key} {value:.1e}" for key, value in record.items() if key.startswith("lr_")]  # each group's own lr
        parts.append(f"tok/s {record['tokens_per_s']:.0f}")
        if last_eval:
            evaluated = last_eval.get("step", record["step"])  # between evaluations, say which step it is from
            parts.append(f"val_ppl {format_ppl(last_eval['val_ppl'], 1)}" + (f" (step {evaluated})" if evaluated != record["step"] else ""))
        if self.drift is not None:
            parts.append(f"drift {self.drift:.1e}")
        print(" | ".join(parts), file=self.stream, flush=True)  # flushed: a log file shows each line as it happens

    def close(self) -> None:
        pass


def make_progress(total: int, start: int, name: str, stream) -> BarProgress | LineProgress:
    """The bar when `stream` is a terminal, plain lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    return BarProgress(total, start, name, stream) if isatty is not None and isatty() else LineProgress(total, stream)
