"""The training loop, the same for every method: `Method` (methods.py) holds what differs between them.

A run is set up (data, model, parallelism, optimizers, resume), stepped and finished (summary, the
method's files, final/, report), each over one `Run`. Per optimizer step (`train_step`): sample the
global batch (a pure function of the step), run the micro-batches inside the method's step context
(POET's layer form builds its effective weights once per step there), clip, step; then schedule, log,
the method's after-step hook (the layer form's merges), evaluation, checkpoints and the stop signal that
every rank agrees on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..orthogonal import singular_values
from . import checkpoint as ckpt
from . import files, parallel
from .acceleration import accelerate
from .config import ConfigError, TrainConfig, load_config, make_dir, save_config
from .data import (TokenData, load_run_data, make_batch, micro_batch_seed, prepare_data, sample_offsets, val_windows,
                   warn_if_reloaded_otherwise)
from .evaluate import perplexity
from .methods import Method, build_schedulers, lr_factor, make_method
from .metrics import MetricsLogger, standard_json
from .models import block_linears, data_tokenizer, load_model, save_architecture
from .progress import make_progress
from .report import write_report
from .runs import absolute_places, check_identity, check_steps, data_options, run_identity


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where and what is kept."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    last_merge_step: int | None = None
    initial_val_ppl: float | None = None  # finetuning: the base model's perplexity before the first step
    micro_batches: int | None = None  # per step, over all processes (grad_accum × processes): the global batch

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "last_merge_step": self.last_merge_step,
                "initial_val_ppl": self.initial_val_ppl, "micro_batches": self.micro_batches}

    def load_state_dict(self, saved: dict) -> None:
        for key, value in saved.items():
            setattr(self, key, value)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.dtype == "bf16":
        return torch.bfloat16
    if config.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def spectrum_layer(model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """Singular values of the layer the report plots: the last block's MLP output projection, which is the
    last block linear in every architecture (LLaMA's down_proj, GPT-2's mlp.c_proj). None under LoRA,
    whose weight (base + BA) no single module holds."""
    linears = block_linears(model)
    if not linears or hasattr(model, "peft_config"):
        return None
    name, module = linears[-1]
    with parallel.full_parameters(module):
        weight = module.effective_weight() if hasattr(module, "effective_weight") else module.weight
        return name, singular_values(weight)


def trainable_counts(model: nn.Module, method: Method) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": total, "block_linear_trainable_params": method.block_linear_params(model)}


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the step loop: it stops the run as SIGINT does there (Python raises KeyboardInterrupt)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises Terminated, where the default would kill the process before it cleans up (a claimed run
    directory without a checkpoint). The step loop's StopSignal takes over inside."""
    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def micro_batch_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(inputs.device.type, dtype=amp, enabled=amp is not None):
        # No KV cache: training never reads it, and it hands each block its own cache entry, so compiled
        # blocks could not share one graph.
        logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(method: Method, model, raw_model, optimizers, data: TokenData, config: TrainConfig, state: TrainState,
               runtime: parallel.Runtime, amp, sharded: bool = False) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches on every rank; returns (mean loss, grad norm)."""
    rows = config.batch_size
    global_rows = rows * config.grad_accum * runtime.world_size
    offsets = sample_offsets(len(data.train), state.step, global_rows, config.data.seq_len, config.seed)
    total = 0.0
    with method.step_context(raw_model, sharded):
        for micro in range(config.grad_accum):
            index = micro * runtime.world_size + runtime.rank  # the micro-batch's place in the global batch
            torch.manual_seed(micro_batch_seed(config.seed, state.step, index))
            start = index * rows
            inputs, targets = make_batch(data.train, offsets[start: start + rows], config.data.seq_len)
            inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
            last = micro == config.grad_accum - 1
            sync = model.no_sync() if runtime.distributed and not last and hasattr(model, "no_sync") else contextlib.nullcontext()
            with sync:
                loss = micro_batch_loss(model, inputs, targets, amp) / config.grad_accum
                loss.backward()
            total += loss.item()
            del loss  # its graph holds the step's weights; drop it before the rotation backward and the optimizer step
    method.after_backward(raw_model, runtime, sharded)
    loss_value = parallel.mean_over_ranks(total, runtime)
    if not math.isfinite(loss_value):
        raise TrainingError(f"non-finite loss ({loss_value}) at step {state.step + 1}")
    threshold = method.clip_threshold(state.step, state.last_merge_step)
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), threshold))
    if not math.isfinite(grad_norm):  # a finite loss can still have inf/nan gradients: never apply them
        raise TrainingError(f"non-finite gradient norm ({grad_norm}) at step {state.step + 1}")
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def load_data(config: TrainConfig, runtime: parallel.Runtime, run_dir: Path | None = None) -> TokenData:
    """Rank 0 builds the tokenizer and token cache; the others wait, then read it. A resumed run (run_dir)
    gets its own tokenizer and tokens back, whatever happened to the data since."""
    def build():
        if run_dir is not None:
            return load_run_data(run_dir, config.data.data, **data_options(config))
        tokenizer = data_tokenizer(config)  # checked first: a refused tokenizer leaves no cache directory behind
        make_dir(data_options(config)["cache_root"], "data.cache_dir")
        return prepare_data(config.data.data, tokenizer=tokenizer, **data_options(config))

    if runtime.is_main:
        data = build()
    parallel.barrier(runtime)
    if not runtime.is_main:
        data = build()
    return data


def claim_run_dir(config: TrainConfig) -> Path:
    """Create out_dir/NAME, or NAME-2, NAME-3, … when taken: mkdir is atomic, so concurrent runs never share one."""
    base = Path(config.out_dir) / config.run_name
    make_dir(base.parent, "out_dir")
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")


def _claim_shared_run_dir(config: TrainConfig, runtime: parallel.Runtime) -> Path:
    # Every rank must write its checkpoints (if any) to the same place.
    return Path(parallel.from_main(str(claim_run_dir(config)) if runtime.is_main else None, runtime))


@sigterm_as_interrupt()
def train(config: TrainConfig | None = None, resume: str | Path | None = None, run_dir: str | Path | None = None) -> dict:
    """Run (or resume) training; returns the summary dict also written to run_dir/summary.json."""
    if resume is not None:
        run_dir = Path(resume).resolve()
        config = load_config(run_dir / "config.json")
    else:
        config = absolute_places(config)
    runtime = parallel.setup(config.device)
    claimed, clean = None, False
    try:
        if run_dir is None:
            run_dir = claimed = _claim_shared_run_dir(config, runtime)
        with _held_by_main(Path(run_dir), runtime):
            summary = _train(config, runtime, resume is not None, Path(run_dir))
        clean = True
        return summary
    except BaseException:
        # A run that failed before its first checkpoint has nothing to resume; left behind, its directory
        # would only push the next run of this name to NAME-2.
        if claimed is not None and runtime.is_main and not ckpt.list_checkpoints(claimed):
            shutil.rmtree(claimed, ignore_errors=True)
            print(f"poetlm: removed {claimed}: the run stopped before its first checkpoint", file=sys.stderr)
        raise
    finally:
        parallel.teardown(runtime, clean)


@contextlib.contextmanager
def _held_by_main(run_dir: Path, runtime: parallel.Runtime):
    """The run directory held by rank 0 for the whole run (`files.exclusive`); every rank stops if another
    process holds it."""
    with contextlib.ExitStack() as held:
        refusal = None
        if runtime.is_main:
            try:
                held.enter_context(files.exclusive(run_dir))
            except files.DirectoryInUse as error:
                refusal = str(error)
        refusal = parallel.from_main(refusal, runtime)
        if refusal:
            raise TrainingError(refusal)
        yield


@dataclass
class Run:
    """What one training run holds from setup through its steps to finish."""

    config: TrainConfig
    runtime: parallel.Runtime
    run_dir: Path
    resuming: bool
    data: TokenData
    method: Method
    model: nn.Module    # what the method, checkpoints and diagnostics see
    wrapped: nn.Module  # what forward passes go through: the model itself, or its DDP / FSDP2 form
    optimizers: list[torch.optim.Optimizer]
    schedulers: list
    sharded: bool
    amp: torch.dtype | None
    state: TrainState = field(default_factory=TrainState)
    logger: MetricsLogger | None = None
    spectrum: tuple[str, torch.Tensor] | None = None  # the plotted layer's singular values at the start
    last_eval: dict | None = None
    identity: dict | None = None  # what its checkpoints record of the run (runs.run_identity); on the main process

    def evaluate(self) -> dict:
        config, runtime = self.config, self.runtime
        return perplexity(self.wrapped, self.data.val, seq_len=config.data.seq_len, batch_size=config.batch_size,
                          max_tokens=config.eval_tokens, device=runtime.device, autocast_dtype=self.amp,
                          rank=runtime.rank, world_size=runtime.world_size)

    def save(self) -> None:
        model_state, optimizer_states = parallel.training_state(self.model, self.optimizers, self.sharded)
        if self.runtime.is_main:
            payload = {"model": model_state, "optimizers": optimizer_states,
                       "schedulers": [s.state_dict() for s in self.schedulers], "state": self.state.state_dict(),
                       "method": self.method.state_dict(), "run": self.identity}
            ckpt.save_checkpoint(self.run_dir, self.state.step, payload, self.config.keep_checkpoints)
        parallel.barrier(self.runtime)

    @property
    def tokens_per_step(self) -> int:
        config = self.config
        return config.batch_size * config.grad_accum * self.runtime.world_size * config.data.seq_len

    def due(self, every: int) -> bool:
        """Whether the step just taken is one of every `every` steps, or the last."""
        return self.state.step % every == 0 or self.state.step == self.config.steps


def _train(config: TrainConfig, runtime: parallel.Runtime, resuming: bool, run_dir: Path) -> dict:
    run = _setup(config, runtime, resuming, run_dir)
    if resuming and run.state.step >= config.steps and finished(run_dir):  # going on would only rewrite its files
        if runtime.is_main:
            print(f"{run_dir} already finished ({run.state.step} of {config.steps} steps): nothing to do, nothing changed")
        return {"already_finished": True, "step": run.state.step, "run_dir": str(run_dir), "rank": runtime.rank}
    try:
        _start(run)
        return _steps(run) or _finish(run)
    except BaseException:
        if run.logger is not None:  # its writers hold files in the run directory, which a failed run may remove
            run.logger.close()
        raise


def finished(run_dir: Path) -> bool:
    """Whether the run's finish stage completed: summary.json and then report.md are the last files it writes
    (`poetlm report` alone may have written a report.md)."""
    return (run_dir / "summary.json").is_file() and (run_dir / "report.md").is_file()


def _setup(config: TrainConfig, runtime: parallel.Runtime, resuming: bool, run_dir: Path) -> Run:
    """Data, model, optimizers and schedulers, restored from the last checkpoint when resuming."""
    torch.manual_seed(config.seed)
    data = load_data(config, runtime, run_dir if resuming else None)
    val_windows(data.val, config.data.seq_len, config.eval_tokens)  # now, not at the first evaluation after hours of steps
    method = make_method(config)
    sharded = parallel.is_sharded(runtime, config.parallel)
    if sharded and not method.supports_fsdp:
        raise ConfigError(f"method {config.method!r} does not run under FSDP (parallel='fsdp'); use parallel='ddp'")
    built = load_model(config, data.tokenizer, run_dir if resuming else None)
    model = accelerate(method.prepare(built).to(runtime.device), config)
    wrapped = parallel.parallelize(model, runtime, config.parallel)  # FSDP2 swaps in sharded parameters: before the optimizers
    optimizers = method.optimizers(model)
    run = Run(config, runtime, run_dir, resuming, data, method, model, wrapped, optimizers,
              build_schedulers(optimizers, config), sharded, autocast_dtype(config, runtime.device))
    if resuming:
        saved = ckpt.load_checkpoint(run_dir, map_location="cpu" if sharded else runtime.device)
        run.identity = run_identity(config, run_dir)  # of config.json as it reads: keep_global_batch's grad_accum is this session's
        check_identity(saved, run.identity, run_dir)
        check_steps(config, saved["path"])
        with ckpt.restoring(saved["path"]):
            parallel.load_training_state(model, optimizers, saved["model"], saved["optimizers"], sharded)
            for scheduler, s in zip(run.schedulers, saved["schedulers"], strict=True):
                scheduler.load_state_dict(s)
            run.state.load_state_dict(saved["state"])
            method.load_state_dict(saved["method"])
            ckpt.set_rng_state(saved["rng"])
        run.config = keep_global_batch(config, run.state, runtime)
    else:
        run.state.micro_batches = config.grad_accum * runtime.world_size
    if runtime.is_main and not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
        save_architecture(built, config, run_dir)
        data.tokenizer.save_pretrained(run_dir / "tokenizer")
        # The run's own id: a run like it on the same data (same config, same tokens) is still another run.
        record = {**data.record(), "run_id": uuid.uuid4().hex}
        files.write_text(run_dir / "data.json", json.dumps(record, indent=2) + "\n")
        run.identity = run_identity(config, run_dir)
    return run


def keep_global_batch(config: TrainConfig, state: TrainState, runtime: parallel.Runtime) -> TrainConfig:
    """The config a run resumed on `runtime.world_size` processes steps with: grad_accum set so that every step
    still takes the run's global batch, the same rows of the same windows (train_step), split otherwise."""
    if state.micro_batches is None:  # a checkpoint from before this was recorded: its world size is unknown
        state.micro_batches = config.grad_accum * runtime.world_size
    if state.micro_batches == config.grad_accum * runtime.world_size:
        return config
    if state.micro_batches % runtime.world_size:
        raise ConfigError(f"this run's steps take {state.micro_batches} micro-batches of batch_size={config.batch_size} "
                          f"(grad_accum × processes), which {runtime.world_size} processes cannot share evenly: resume "
                          f"it on a number of processes that divides {state.micro_batches}")
    accum = state.micro_batches // runtime.world_size
    if runtime.is_main:
        print(f"poetlm: note: resuming on {runtime.world_size} process(es), not {state.micro_batches // config.grad_accum}: "
              f"grad_accum {config.grad_accum} → {accum} keeps the run's {state.micro_batches * config.batch_size} "
              "sequences per step", file=sys.stderr)
    return dataclasses.replace(config, grad_accum=accum)


def _start(run: Run) -> None:
    """Before the first step: metrics, the initial spectrum and (finetuning) the base model's perplexity."""
    config, runtime, run_dir = run.config, run.runtime, run.run_dir
    run.logger = MetricsLogger(run_dir, enabled=runtime.is_main, resume_step=run.state.step if run.resuming else None,
                               config=config)
    run.spectrum = spectrum_layer(run.model)  # on every rank: gathering a sharded layer is collective
    if runtime.is_main and not run.resuming and run.spectrum is not None:
        (run_dir / "spectrum_initial.json").write_text(json.dumps({"layer": run.spectrum[0], "initial": run.spectrum[1].tolist()}))
    if config.finetuning and not run.resuming:
        before = run.evaluate()
        run.state.initial_val_ppl = before["val_ppl"]
        run.logger.log({"step": 0, "tokens": 0, **before})


class _Throughput:
    """Tokens per second over the steps since the last logged one, evaluation and diagnostics left out."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def rate(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        self.start += time.perf_counter() - began


def _steps(run: Run) -> dict | None:
    """The step loop; returns the summary of a run that a signal stopped (after a checkpoint), else None."""
    config, state = run.config, run.state
    progress = _progress(config, run.runtime, state.step)
    throughput = _Throughput()
    with StopSignal() as stop:
        while state.step < config.steps:
            record = _step(run)
            throughput.tokens += run.tokens_per_step
            logged = run.due(config.log_every)
            if logged:
                record.update(tokens_per_s=throughput.rate(), peak_mem_mb=peak_memory_mb(run.runtime.device))
                if run.due(config.diagnostics_every):
                    record.update(run.method.diagnostics(run.model, run.optimizers, spectrum=True))
                run.logger.log(record)
                throughput.restart()
            if run.method.after_step(state.step, run.model, run.optimizers):  # after the diagnostics, which would see fresh identities
                state.last_merge_step = state.step
            if run.due(config.eval_every):
                with throughput.paused():
                    run.last_eval = {**run.evaluate(), "step": state.step}
                run.logger.log({"tokens": state.tokens, **run.last_eval})
            if progress is not None:
                progress.step(record, run.last_eval, logged)
            saved = run.due(config.checkpoint_every)
            if saved:
                with throughput.paused():  # tokens/s measures training, as it leaves evaluation out
                    run.save()
            received = parallel.agreed_signal(stop.received, run.runtime)
            if received is not None:
                if not saved:
                    run.save()
                _close(progress, run.logger)
                return _interrupted(run, received)
    _close(progress, run.logger)
    return None


def _step(run: Run) -> dict:
    """One optimizer step and its schedule; returns the step's metrics record."""
    config, state = run.config, run.state
    run.model.train()
    factor = lr_factor(state.step, config)
    try:
        loss, grad_norm = train_step(run.method, run.wrapped, run.model, run.optimizers, run.data, config, state,
                                     run.runtime, run.amp, run.sharded)
    except TrainingError as error:
        good = ckpt.list_checkpoints(run.run_dir)
        kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise TrainingError(f"{error}; stopping ({kept}). Try a lower learning rate or a tighter optim.grad_clip.") from None
    for scheduler in run.schedulers:
        scheduler.step()
    state.step += 1
    state.tokens += run.tokens_per_step
    return {"step": state.step, "tokens": state.tokens, "loss": loss, **run.method.learning_rates(factor), "grad_norm": grad_norm}


def _close(progress, logger: MetricsLogger) -> None:
    if progress is not None:
        progress.close()
    logger.close()


def _interrupted(run: Run, received: int) -> dict:
    if run.runtime.is_main:
        print(f"\n{signal.Signals(received).name} received: checkpoint at step {run.state.step} written to "
              f"{ckpt.checkpoint_dir(run.run_dir)}.\nResume with: poetlm train --resume {run.run_dir}", file=sys.stderr)
    return {"interrupted": True, "signal": received, "step": run.state.step, "run_dir": str(run.run_dir), "rank": run.runtime.rank}


def _finish(run: Run) -> dict:
    """After the last step: the summary, the spectrum, the method's own files (an adapter), final/ and the report.
    Also what a resumed run whose steps were all taken before does: its finish stage was cut short."""
    config, runtime, model, method, run_dir = run.config, run.runtime, run.model, run.method, run.run_dir
    if runtime.is_main:
        files.remove_temporaries(run_dir)  # a half-written final/ (or file) of a finish stage cut short by a kill
    if run.last_eval is None:  # resumed after the last step: the model is the one that step's evaluation scored
        run.last_eval = {**run.evaluate(), "step": run.state.step}
    last = run.last_eval
    summary = {"method": config.method, **trainable_counts(model, method),
               "final_val_ppl": last["val_ppl"], "final_val_loss": last["val_loss"],
               "initial_val_ppl": run.state.initial_val_ppl, "tokens_per_s": run.logger.median("tokens_per_s"),
               # Over the whole run: a resumed run's logger holds its earlier sessions' records too.
               "peak_mem_mb": max(peak_memory_mb(runtime.device), run.logger.maximum("peak_mem_mb") or 0.0),
               "total_tokens": run.state.tokens, "steps": run.state.step,
               "world_size": runtime.world_size, "replica_divergence": parallel.replica_divergence(model, runtime),
               "run_dir": str(run_dir), "rank": runtime.rank,
               # The method's core promise: every rotated weight keeps its singular values (None: not a POET run).
               "spectrum_drift": method.diagnostics(model, run.optimizers, spectrum=True).get("spectrum_drift")}
    final_spectrum = spectrum_layer(model)  # on every rank: gathering a sharded layer is collective
    if runtime.is_main and run.spectrum is not None:
        initial = json.loads((run_dir / "spectrum_initial.json").read_text())
        files.write_text(run_dir / "spectrum.json", standard_json({**initial, "final": final_spectrum[1].tolist()}))
    # Likewise the whole model, for its last uses: the method's files and final/ (LoRA merges in place).
    with parallel.full_parameters(model):
        if runtime.is_main:
            method.finish(model, run_dir)
            write_final(method, model, run.data.tokenizer, run_dir)
    if runtime.is_main:
        files.write_text(run_dir / "summary.json", standard_json(summary, indent=2) + "\n")
        try:
            write_report([run_dir], run_dir)
        except Exception as error:  # all the run made is on disk: a report's failure, whatever it is, must not fail the run
            print(f"poetlm: warning: {run_dir / 'report.md'} was not written ({type(error).__name__}: {error}); the run "
                  f"is complete; try again with: poetlm report {run_dir}", file=sys.stderr)
        _warn_if_diverged(last["val_loss"], len(run.data.tokenizer), (run.logger.values.get("loss") or [None])[-1])
    return summary


def _warn_if_diverged(val_loss: float, vocab_size: int, train_loss: float | None = None) -> None:
    """A run that ends far worse than guessing every token uniformly (loss ln V, about where a fresh model
    starts) diverged, its numbers finite or not; unless its training loss is below that guess's: then it
    learned its training text and does not carry over to the validation text (a tiny or unlike split)."""
    uniform = math.log(vocab_size)
    if val_loss <= uniform + 1:
        return
    head = (f"poetlm: warning: the final validation loss {val_loss:.4g} is far above ln({vocab_size}) = {uniform:.2f}, "
            "a uniform guess's over the vocabulary")
    if math.isfinite(val_loss) and train_loss is not None and train_loss < uniform:
        print(f"{head}, while the training loss is {train_loss:.4g}: the model fits its training text and not the "
              "validation text (overfitting: a small corpus, or a validation split unlike the rest); use more data",
              file=sys.stderr)
    else:
        print(f"{head}: the run diverged; lower the learning rate (or check the data)", file=sys.stderr)


def write_final(method: Method, model: nn.Module, tokenizer, run_dir: Path) -> None:
    """run_dir/final/: the trained model and its tokenizer as a Hugging Face directory, for
    `AutoModelForCausalLM.from_pretrained` without poetlm. Written under another name and renamed into
    place, so a final/ directory is always complete."""
    from transformers.utils import logging as hf_logging

    final = run_dir / "final"
    tmp = files.temp_path(final)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar: a carriage-return bar in logs
    try:
        method.save_final(model, tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    warn_if_reloaded_otherwise(final, tokenizer)


def _progress(config: TrainConfig, runtime: parallel.Runtime, start: int, stream=None):
    """A bar on a terminal, one plain line per log interval elsewhere (stream: default stderr, as tqdm's)."""
    if not (config.progress and runtime.is_main):
        return None
    return make_progress(config.steps, start, config.run_name, stream if stream is not None else sys.stderr)
