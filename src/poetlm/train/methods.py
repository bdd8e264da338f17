"""The training methods behind one interface; the loop never asks which method it runs.

- `poet` (the default): POET in its fold-every-step form, `poetlm.optim.POET` rotating the block linears'
  weights with the configured update rule (`[rule]`); embeddings, norms and head train with AdamW.
- `poet-paper`: the paper's reparameterized form, POETLinear layers, AdamW on the skew parameters, a
  merge every `poet.merge_every` steps with the optimizer state reset and a tightened clip after it.
- `adamw`, `muon`: baselines in the same harness; `lora`: peft adapters for finetuning.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn

from ..adapter import ADAPTER_FILE, MergeHistory, base_fingerprint, fingerprint_mismatch, save_adapter
from ..config import POETConfig
from ..diagnostics import model_diagnostics
from ..model import (merge, param_groups, poet_layers, poetize, rotated_weights, rotation_parameters, step_weight_cache,
                     transposed_names)
from ..optim import POET, adamw
from ..primitives import block_layout
from ..serialization import save_pretrained
from ..tuner import write_adapter_config
from . import parallel
from .checkpoint import CheckpointError
from .config import TrainConfig
from .models import ModelError, block_linears

LLAMA_BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hidden_matrices(model: nn.Module) -> set[int]:
    """The weights of the block linears (in any architecture): what Muon and AdamW's lr_hidden train."""
    return {id(m.weight) for _, m in block_linears(model) if m.weight.requires_grad}


def _split_groups(groups: list[dict], ids: set[int]) -> list[dict]:
    """The groups without the parameters in `ids` (empty groups dropped)."""
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    return [g for g in rest if g["params"]]


def poet_config(config: TrainConfig) -> POETConfig:
    values = config.poet.to_dict()
    if config.finetuning:  # W0 is the pretrained weight itself, so the wrapped model starts where the base is
        values["init"] = "keep"
    return POETConfig.from_dict(values)


class Method:
    """What differs between methods: the model they train, their optimizers and what follows a step.

    The loop (`train/loop.py`) calls these in order: prepare, optimizers; per step step_context (around the
    micro-batches), after_backward, clip_threshold, learning_rates, after_step, diagnostics on diagnostic steps;
    state_dict / load_state_dict with checkpoints; finish and save_final at the end.
    """

    name = ""
    supports_fsdp = True

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        opt = self.config.optim
        groups = param_groups(model, lr_base=opt.lr, lr_poet=opt.lr, weight_decay=opt.weight_decay)
        return [adamw(groups, betas=(opt.beta1, opt.beta2))]

    def step_context(self, model: nn.Module, sharded: bool):
        """Wraps the micro-batches of one optimizer step."""
        return contextlib.nullcontext()

    def after_backward(self, model: nn.Module, runtime: parallel.Runtime, sharded: bool) -> None:
        """After the last micro-batch, before clipping."""

    def clip_threshold(self, step: int, last_merge_step: int | None) -> float:
        return self.config.optim.grad_clip

    def learning_rates(self, factor: float) -> dict[str, float]:
        """What a step's metrics show as its learning rates, at schedule factor `factor`."""
        return {"lr": self.config.optim.lr * factor}

    def after_step(self, step: int, model: nn.Module, optimizers) -> bool:
        """After optimizer step `step` (1-based); True if it merged (for the clip ramp)."""
        return False

    def diagnostics(self, model: nn.Module, optimizers, spectrum: bool) -> dict:
        return {}

    def state_dict(self) -> dict:
        """What the method itself must checkpoint beyond the model and optimizers."""
        return {}

    def load_state_dict(self, saved: dict) -> None:
        pass

    def finish(self, model: nn.Module, run_dir) -> None:
        """At the end of the run, on the main process: write what the method adds to the run directory."""

    def save_final(self, model: nn.Module, directory) -> None:
        """At the end of the run, after `finish`: the trained model as a Hugging Face directory that
        `from_pretrained` loads without poetlm. The model is not used afterwards and may change in place."""
        model.save_pretrained(directory)

    def block_linear_params(self, model: nn.Module) -> int:
        """Trainable parameters of the block linears, as the paper counts them."""
        return sum(p.numel() for _, m in block_linears(model) for p in m.parameters() if p.requires_grad and p.dim() == 2)


class AdamW(Method):
    """One AdamW; `optim.lr_hidden` (if set) is the block matrices' lr, `optim.lr` everything else's."""

    name = "adamw"

    def optimizers(self, model):
        opt = self.config.optim
        if opt.lr_hidden is None:
            return super().optimizers(model)
        groups = param_groups(model, lr_base=opt.lr, lr_poet=opt.lr, weight_decay=opt.weight_decay)
        hidden = _hidden_matrices(model)
        hidden_group = {"name": "hidden", "params": [p for p in model.parameters() if id(p) in hidden],
                        "lr": opt.lr_hidden, "weight_decay": opt.weight_decay}
        return [adamw([hidden_group, *_split_groups(groups, hidden)], betas=(opt.beta1, opt.beta2))]

    def learning_rates(self, factor):
        hidden = {} if self.config.optim.lr_hidden is None else {"lr_hidden": self.config.optim.lr_hidden * factor}
        return {**super().learning_rates(factor), **hidden}


class Muon(Method):
    name = "muon"

    def optimizers(self, model):
        opt = self.config.optim
        groups = param_groups(model, lr_base=opt.lr, lr_poet=opt.lr, weight_decay=opt.weight_decay)
        hidden = _hidden_matrices(model)
        if not hidden:
            raise ModelError("Muon trains the decoder blocks' 2-D weights, and this model has none to train: "
                             "use --method adamw")
        # "match_rms_adamw" scales Muon's update to AdamW's RMS, so one learning-rate range serves both.
        muon = torch.optim.Muon([p for p in model.parameters() if id(p) in hidden], lr=opt.lr_muon or opt.lr,
                                weight_decay=opt.weight_decay, adjust_lr_fn="match_rms_adamw")
        return [muon, adamw(_split_groups(groups, hidden), betas=(opt.beta1, opt.beta2))]

    def learning_rates(self, factor):
        opt = self.config.optim
        return {**super().learning_rates(factor), "lr_muon": (opt.lr_muon or opt.lr) * factor}  # the hidden matrices' lr


def _refuse_useless_rank(model: nn.Module, rank: int) -> None:
    """B·A of a rank above min(in, out) spans nothing more, but its parameters would count in the comparison."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, layer.in_features, layer.out_features) for name, layer in model.named_modules()
              if isinstance(layer, LoraLayer)]
    name, fan_in, fan_out = min(layers, key=lambda layer: min(layer[1:]))
    if rank > min(fan_in, fan_out):
        raise ModelError(f"finetune.lora_rank={rank} exceeds min(in, out) = {min(fan_in, fan_out)} of {name} "
                         f"({fan_in}→{fan_out}), where a larger rank adds parameters but no expressiveness; use "
                         f"finetune.lora_rank={min(fan_in, fan_out)} or less, or target larger layers (finetune.lora_targets)")


class LoRA(Method):
    name = "lora"

    def prepare(self, model):
        from peft import LoraConfig, get_peft_model

        finetune = self.config.finetune
        names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        # The paper's LoRA baseline adapts all seven block linears of LLaMA; other architectures get peft's defaults.
        targets = finetune.lora_targets or (LLAMA_BLOCK_LINEARS if set(LLAMA_BLOCK_LINEARS) <= names else None)
        if isinstance(targets, str) and re.fullmatch(r"[\w.]+", targets):
            targets = [targets]  # a name: peft would take a string as a regex of whole names, which "q_proj" never is
        try:
            model = get_peft_model(model, LoraConfig(r=finetune.lora_rank, lora_alpha=finetune.lora_alpha,
                                                     target_modules=targets, lora_dropout=0.0))
        except ValueError as error:
            raise ModelError(f"LoRA cannot wrap this model ({error}); set finetune.lora_targets to its linear layer names "
                             "(a list such as [\"q_proj\", \"v_proj\"], or a regex that matches whole module names)") from None
        _refuse_useless_rank(model, finetune.lora_rank)
        _freeze_base(model, self.config, {id(p) for name, p in model.named_parameters() if "lora_" in name})
        return model

    def save_final(self, model, directory):
        model.merge_and_unload().save_pretrained(directory)  # W + BA in the base's own layers: a plain model


class POETFold(Method):
    """POET folded into the weights every step: plain nn.Linear layers, `poetlm.optim.POET` rotating them."""

    name = "poet"

    def prepare(self, model):
        try:
            self.named_weights = rotated_weights(model, poet_config(self.config))
            self.weights = [weight for _, weight in self.named_weights]
            self.transposed = transposed_names(model, self.named_weights)
        except ValueError as error:
            raise ModelError(str(error)) from None
        if self.config.finetuning:
            _freeze_base(model, self.config, {id(w) for w in self.weights})
        return model

    def optimizers(self, model):
        cfg = self.config
        # FSDP2 swaps in sharded parameters after prepare(): the weights by name, as the model holds them now.
        current = dict(model.named_parameters())
        self.named_weights = [(name, current.get(name, weight)) for name, weight in self.named_weights]
        self.weights = [weight for _, weight in self.named_weights]
        ids = {id(w) for w in self.weights}
        groups = param_groups(model, lr_base=cfg.optim.lr, lr_poet=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        try:
            rotations = POET(self.named_weights, lr=cfg.optim.lr_poet, poet=poet_config(cfg), rule=cfg.rule,
                             gather=parallel.whole_tensor, split=parallel.rank_split(model), transposed=self.transposed)
        except ValueError as error:  # e.g. an "fs" fraction too small to rotate a weight: as the layer form says it
            raise ModelError(str(error)) from None
        rest = _split_groups(groups, ids)
        return [rotations] + ([adamw(rest, betas=(cfg.optim.beta1, cfg.optim.beta2))] if rest else [])

    def diagnostics(self, model, optimizers, spectrum):
        return {"spectrum_drift": optimizers[0].spectrum_drift()} if spectrum else {}

    def learning_rates(self, factor):
        return {**super().learning_rates(factor), "lr_poet": self.config.optim.lr_poet * factor}  # the lr that drives POET

    def block_linear_params(self, model):
        """The rotation parameters one step trains: b(b−1)/2 per block and side, as the layer form counts them."""
        poet = poet_config(self.config)
        return sum(size * (size - 1) // 2 for weight in self.weights for dim in weight.shape
                   for size in block_layout(poet.variant, dim, poet.block_size, poet.fraction)[1])


class POETPaper(Method):
    """The paper's recipe: reparameterized layers, AdamW on the skew parameters, merge-then-reinitialize."""

    name = "poet-paper"

    def prepare(self, model):
        try:
            poetize(model, poet_config(self.config))
        except ValueError as error:  # e.g. a model built from Conv1D layers: a user-facing problem, not a crash
            raise ModelError(str(error)) from None
        if self.config.finetuning:
            _freeze_base(model, self.config, {id(p) for p in rotation_parameters(model)})
            # The adapter replays the run on the base: the pre-merge rotations of every merge, recorded here.
            self.history, self.fingerprint = MergeHistory(), base_fingerprint(model)
            self.layer_sizes = {name: (module.weight0 if hasattr(module, "weight0") else module.weight).numel()
                                for name, module in model.named_modules() if name in self.fingerprint}
        return model

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict(), "base_fingerprint": self.fingerprint} if self.config.finetuning else {}

    def load_state_dict(self, saved: dict) -> None:
        if not self.config.finetuning:
            return
        self.history.load_state_dict(saved["history"])
        started = saved.get("base_fingerprint")  # None: a checkpoint from before it was recorded
        if started is None:
            return
        # The adapter replays the merges on the base the run started from: a base changed since would be
        # fingerprinted instead, and the adapter would rebuild another model.
        sizes = {name: numel for name, numel in self.layer_sizes.items() if name in started}
        mismatch = fingerprint_mismatch(self.fingerprint, started, sizes, "this run")
        if mismatch:
            raise CheckpointError(f"finetune.base_model={self.config.finetune.base_model!r} changed since the run "
                                  f"started: {mismatch}")
        self.fingerprint = started

    def save_final(self, model, directory):
        save_pretrained(model, directory, merged=True)  # every POET layer as the dense weight it computes

    def finish(self, model, run_dir):
        if self.config.finetuning:
            rotation_ids = {id(p) for p in rotation_parameters(model)}
            trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in rotation_ids]
            save_adapter(model, run_dir / ADAPTER_FILE, history=self.history, trained=trained,
                         base_fingerprint=self.fingerprint)
            # The run directory then opens as an adapter directory: POETModel.from_pretrained(base, run_dir).
            layer_config = next(poet_layers(model))[1].config
            write_adapter_config(run_dir, model, layer_config, [f"^{re.escape(name)}$" for name in trained], len(self.history))

    def optimizers(self, model):
        opt = self.config.optim
        groups = param_groups(model, lr_base=opt.lr, lr_poet=opt.lr_poet, weight_decay=opt.weight_decay)
        return [adamw(groups, betas=(opt.beta1, opt.beta2))]

    def step_context(self, model, sharded):
        # FSDP2 gathers parameters only inside each block's forward, so sharded runs rebuild weights per micro-batch.
        return contextlib.nullcontext() if sharded else step_weight_cache(model)

    def after_backward(self, model, runtime, sharded):
        if not sharded:
            parallel.all_reduce_rotation_grads(model, runtime)

    def clip_threshold(self, step, last_merge_step):
        """The global clip, tightened to 0.1× right after a merge and ramped back to 1× (paper §5)."""
        opt = self.config.optim
        since = None if last_merge_step is None else step - last_merge_step
        if since is None or since >= opt.merge_clip_steps:
            return opt.grad_clip
        return opt.grad_clip * (0.1 + 0.9 * since / opt.merge_clip_steps)

    def learning_rates(self, factor):
        return {**super().learning_rates(factor), "lr_poet": self.config.optim.lr_poet * factor}  # the lr that drives POET

    def after_step(self, step, model, optimizers):
        if step % self.config.poet.merge_every != 0 or step >= self.config.steps:
            return False
        if self.config.finetuning:
            self.history.record(model)
        merge(model, optimizers[0], gather=parallel.full_parameters)
        return True

    def diagnostics(self, model, optimizers, spectrum):
        diag = model_diagnostics(model, spectrum=spectrum, gather=parallel.full_parameters)
        keys = ["q_norm", "orth_err", "probe_cos"] + (["spectrum_drift"] if spectrum else [])
        return {key: diag[key + "_max" if key == "spectrum_drift" else key] for key in keys}

    def block_linear_params(self, model):
        return sum(p.numel() for p in rotation_parameters(model))


METHOD_CLASSES = {cls.name: cls for cls in (POETFold, POETPaper, AdamW, Muon, LoRA)}


def make_method(config: TrainConfig) -> Method:
    return METHOD_CLASSES[config.method](config)


def prepare_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The model as `config.method` trains it (e.g. with POET layers), for rebuilding a run's model."""
    return make_method(config).prepare(model)


def _freeze_base(model: nn.Module, config: TrainConfig, keep: set[int]) -> None:
    """Finetuning with POET or LoRA trains only `keep` (plus norms and biases when asked)."""
    keep = set(keep)
    for module in model.modules():
        if config.finetune.train_norms and "norm" in type(module).__name__.lower():
            keep |= {id(p) for p in module.parameters(recurse=False)}
    if config.finetune.train_biases:
        biases = {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
        if not biases:
            raise ModelError("finetune.train_biases=true, but the model has no biases (no parameter named *.bias): "
                             "leave it false")
        keep |= biases
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from 1 toward min_lr_ratio, which step `config.steps` would reach: the
    last step (steps - 1, 0-based) runs slightly above it, as transformers' get_cosine_schedule_with_warmup does."""
    opt = config.optim
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, config.steps - opt.warmup_steps)
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_schedulers(optimizers, config: TrainConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, config)) for o in optimizers]
