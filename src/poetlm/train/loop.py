"""The training loop: one function, the same for POET, AdamW and Muon.

Per optimizer step: sample the global batch (a pure function of the step), run the micro-batches
(for POET inside `step_weight_cache`, so effective weights are built once per step), clip, step,
schedule, and for POET merge every `merge_every` steps with the optimizer-state reset and a tightened
clip for the next few steps. Around it: evaluation, metrics, checkpoints, signals, resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..sharding import full_parameters
from . import checkpoint as ckpt
from . import distributed, files
from .acceleration import accelerate
from .config import ConfigError, TrainConfig, load_config, save_config
from .data import TokenData, load_run_data, make_batch, prepare_data, sample_offsets
from .evaluate import perplexity
from .methods import Method, build_schedulers, lr_factor, make_method
from .metrics import MetricsLogger
from .models import block_linears, load_model
from .progress import make_progress
from .report import write_report
from .runs import data_options


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says where and what is kept."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    last_merge_step: int | None = None
    initial_val_ppl: float | None = None  # finetuning: the base model's perplexity before the first step

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "last_merge_step": self.last_merge_step,
                "initial_val_ppl": self.initial_val_ppl}

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
    with full_parameters(module):
        weight = module.effective_weight() if hasattr(module, "effective_weight") else module.weight
        return name, torch.linalg.svdvals(weight.detach().float().cpu())


def trainable_counts(model: nn.Module, method: Method) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": total, "block_linear_trainable_params": method.block_linear_params(model)}


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
               runtime: distributed.Runtime, amp, sharded: bool = False) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches on every rank; returns (mean loss, grad norm)."""
    rows = config.batch_size
    global_rows = rows * config.grad_accum * runtime.world_size
    offsets = sample_offsets(len(data.train), state.step, global_rows, config.data.seq_len, config.seed)
    total = 0.0
    with method.step_context(raw_model, sharded):
        for micro in range(config.grad_accum):
            start = (micro * runtime.world_size + runtime.rank) * rows
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
    loss_value = distributed.mean_over_ranks(total, runtime)
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


def load_data(config: TrainConfig, runtime: distributed.Runtime, run_dir: Path | None = None) -> TokenData:
    """Rank 0 builds the tokenizer and token cache; the others wait, then read it. A resumed run (run_dir)
    gets its own tokenizer and tokens back, whatever happened to the data since."""
    def build():
        if run_dir is not None:
            return load_run_data(run_dir, config.data.data, **data_options(config))
        tokenizer = config.data.tokenizer or config.finetune.base_model  # a finetuned model keeps its own tokenizer
        return prepare_data(config.data.data, tokenizer=tokenizer, **data_options(config))

    if runtime.is_main:
        data = build()
    distributed.barrier(runtime)
    if not runtime.is_main:
        data = build()
    return data


def claim_run_dir(config: TrainConfig) -> Path:
    """Create out_dir/NAME, or NAME-2, NAME-3, … when taken: mkdir is atomic, so concurrent runs never share one."""
    base = Path(config.out_dir) / config.run_name
    base.parent.mkdir(parents=True, exist_ok=True)
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")


def _claim_shared_run_dir(config: TrainConfig, runtime: distributed.Runtime) -> Path:
    run_dir = claim_run_dir(config) if runtime.is_main else None
    if runtime.distributed:  # every rank must write its checkpoints (if any) to the same place
        shared = [str(run_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    return run_dir


def train(config: TrainConfig | None = None, resume: str | Path | None = None, run_dir: str | Path | None = None) -> dict:
    """Run (or resume) training; returns the summary dict also written to run_dir/summary.json."""
    if resume is not None:
        run_dir = Path(resume)
        config = load_config(run_dir / "config.json")
    runtime = distributed.setup(config.device)
    claimed, clean = None, False
    try:
        if run_dir is None:
            run_dir = claimed = _claim_shared_run_dir(config, runtime)
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
        distributed.teardown(runtime, clean)


def _train(config: TrainConfig, runtime: distributed.Runtime, resuming: bool, run_dir: Path) -> dict:
    torch.manual_seed(config.seed)
    data = load_data(config, runtime, run_dir if resuming else None)
    method = make_method(config)
    sharded = distributed.is_sharded(runtime, config.parallel)
    if sharded and not method.supports_fsdp:
        raise ConfigError(f"method {config.method!r} does not run under FSDP (parallel='fsdp'); use parallel='ddp'")
    model = accelerate(method.prepare(load_model(config, data.vocab_size)).to(runtime.device), config)
    state = TrainState()
    wrapped = distributed.wrap_model(model, runtime, config.parallel)  # FSDP2 swaps in sharded parameters: wrap first
    optimizers = method.optimizers(model)
    schedulers = build_schedulers(optimizers, config)
    if resuming:
        saved = ckpt.load_checkpoint(run_dir, map_location="cpu" if sharded else runtime.device)
        distributed.load_training_state(model, optimizers, saved["model"], saved["optimizers"], sharded)
        for scheduler, s in zip(schedulers, saved["schedulers"], strict=True):
            scheduler.load_state_dict(s)
        state.load_state_dict(saved["state"])
        method.load_state_dict(saved["method"])
        ckpt.set_rng_state(saved["rng"])
        if state.step >= config.steps:  # going on would only rewrite its summary and report with less
            if runtime.is_main:
                print(f"{run_dir} already finished ({state.step} of {config.steps} steps): nothing to do, nothing changed")
            return {"already_finished": True, "step": state.step, "run_dir": str(run_dir), "rank": runtime.rank}
    elif runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
        data.tokenizer.save_pretrained(run_dir / "tokenizer")
        files.write_text(run_dir / "data.json", json.dumps(data.record(), indent=2) + "\n")
    amp = autocast_dtype(config, runtime.device)
    counts = trainable_counts(model, method)
    logger = MetricsLogger(run_dir, enabled=runtime.is_main, resume_step=state.step if resuming else None, config=config)
    tokens_per_step = config.batch_size * config.grad_accum * runtime.world_size * config.data.seq_len
    spectrum = spectrum_layer(model)
    if runtime.is_main and not resuming and spectrum is not None:
        (run_dir / "spectrum_initial.json").write_text(json.dumps({"layer": spectrum[0], "initial": spectrum[1].tolist()}))

    def evaluate():
        return perplexity(wrapped, data.val, seq_len=config.data.seq_len, batch_size=config.batch_size,
                          max_tokens=config.eval_tokens, device=runtime.device, autocast_dtype=amp,
                          rank=runtime.rank, world_size=runtime.world_size)

    def save():
        model_state, optimizer_states = distributed.training_state(model, optimizers, sharded)
        if runtime.is_main:
            payload = {"model": model_state, "optimizers": optimizer_states,
                       "schedulers": [s.state_dict() for s in schedulers], "state": state.state_dict(),
                       "method": method.state_dict()}
            ckpt.save_checkpoint(run_dir, state.step, payload, config.keep_checkpoints)
        distributed.barrier(runtime)

    if config.finetuning and not resuming:
        before = evaluate()
        state.initial_val_ppl = before["val_ppl"]
        logger.log({"step": 0, "tokens": 0, **before})
    progress = _progress(config, runtime, state.step)
    last_eval = None
    window_start, window_tokens = time.perf_counter(), 0
    with StopSignal() as stop:
        while state.step < config.steps:
            model.train()
            factor = lr_factor(state.step, config)
            lr = config.optim.lr * factor
            try:
                loss, grad_norm = train_step(method, wrapped, model, optimizers, data, config, state, runtime, amp, sharded)
            except TrainingError as error:
                good = ckpt.list_checkpoints(run_dir)
                kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                raise TrainingError(f"{error}; stopping ({kept}). Try a lower learning rate or a tighter optim.grad_clip.") from None
            for scheduler in schedulers:
                scheduler.step()
            state.step += 1
            state.tokens += tokens_per_step
            window_tokens += tokens_per_step
            record = {"step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            if config.method.startswith("poet"):  # the rotations' lr, the one that drives POET
                record["lr_poet"] = config.optim.lr_poet * factor
            logged = state.step % config.log_every == 0 or state.step == config.steps
            if logged:
                elapsed = time.perf_counter() - window_start
                record.update(tokens_per_s=window_tokens / elapsed, peak_mem_mb=peak_memory_mb(runtime.device))
                if state.step % config.diagnostics_every == 0 or state.step == config.steps:
                    record.update(method.diagnostics(model, optimizers, spectrum=True))
                logger.log(record)
                window_start, window_tokens = time.perf_counter(), 0
            if method.after_step(state.step, model, optimizers):  # after the diagnostics, which would see fresh identities
                state.last_merge_step = state.step
            if state.step % config.eval_every == 0 or state.step == config.steps:
                eval_start = time.perf_counter()
                last_eval = evaluate()
                logger.log({"step": state.step, "tokens": state.tokens, **last_eval})
                window_start += time.perf_counter() - eval_start  # keep evaluation out of tokens/s
            if progress is not None:
                progress.step(record, last_eval, logged)
            if state.step % config.checkpoint_every == 0 or state.step == config.steps:
                save()
            received = distributed.agreed_signal(stop.received, runtime)
            if received is not None:
                if state.step % config.checkpoint_every != 0 and state.step != config.steps:
                    save()
                if progress is not None:
                    progress.close()
                logger.close()
                if runtime.is_main:
                    print(f"\n{signal.Signals(received).name} received: checkpoint at step {state.step} written to "
                          f"{ckpt.checkpoint_dir(run_dir)}.\nResume with: poetlm train --resume {run_dir}", file=sys.stderr)
                return {"interrupted": True, "signal": received, "step": state.step, "run_dir": str(run_dir),
                        "rank": runtime.rank}
    if progress is not None:
        progress.close()
    logger.close()
    summary = {"method": config.method, **counts, "final_val_ppl": last_eval["val_ppl"] if last_eval else None,
               "final_val_loss": last_eval["val_loss"] if last_eval else None, "initial_val_ppl": state.initial_val_ppl,
               "tokens_per_s": logger.median("tokens_per_s"), "peak_mem_mb": peak_memory_mb(runtime.device),
               "total_tokens": state.tokens, "steps": state.step, "world_size": runtime.world_size,
               "replica_divergence": distributed.replica_divergence(model, runtime), "run_dir": str(run_dir),
               "rank": runtime.rank,
               # The method's core promise: every rotated weight keeps its singular values (None: not a POET run).
               "spectrum_drift": method.diagnostics(model, optimizers, spectrum=True).get("spectrum_drift")}
    final_spectrum = spectrum_layer(model)  # on every rank: gathering a sharded layer is collective
    if runtime.is_main:
        if spectrum is not None:
            initial = json.loads((run_dir / "spectrum_initial.json").read_text())
            files.write_text(run_dir / "spectrum.json", json.dumps({**initial, "final": final_spectrum[1].tolist()}))
        method.finish(model, run_dir)
    with full_parameters(model):  # likewise the whole model; final/ is its last use (LoRA merges in place)
        if runtime.is_main:
            write_final(method, model, data.tokenizer, run_dir)
    if runtime.is_main:
        files.write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_report([run_dir], run_dir)
    return summary


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


def _progress(config: TrainConfig, runtime: distributed.Runtime, start: int, stream=None):
    """A bar on a terminal, one plain line per log interval elsewhere (stream: default stderr, as tqdm's)."""
    if not (config.progress and runtime.is_main):
        return None
    return make_progress(config.steps, start, config.run_name, stream if stream is not None else sys.stderr)
