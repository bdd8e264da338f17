"""The three methods as optimizers and schedules. They differ only here and in whether merges happen."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import POETConfig
from ..model import param_groups, poetize, rotation_parameters
from .config import TrainConfig
from .models import ModelError


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """POET wraps the block linears; LoRA adds adapters (peft); AdamW and Muon train the model as it is.

    Finetuning with POET or LoRA trains only the rotations / adapters (plus norms and biases when asked);
    W0 is the pretrained weight itself (init="keep"), so the wrapped model starts exactly where the base is.
    """
    if config.method == "poet":
        poet = config.poet.to_dict()
        if config.finetuning:
            poet["init"] = "keep"
        try:
            poetize(model, POETConfig.from_dict(poet))
        except ValueError as error:  # e.g. a model built from Conv1D layers: a user-facing problem, not a crash
            raise ModelError(str(error)) from None
    elif config.method == "lora":
        from peft import LoraConfig, get_peft_model

        names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        # The paper's LoRA baseline adapts all seven block linears of LLaMA; other architectures get peft's defaults.
        targets = config.poet.target_modules or (LORA_TARGETS if set(LORA_TARGETS) <= names else None)
        try:
            model = get_peft_model(model, LoraConfig(r=config.finetune.lora_rank, lora_alpha=config.finetune.lora_alpha,
                                                     target_modules=targets, lora_dropout=0.0))
        except ValueError as error:
            raise ModelError(f"LoRA cannot wrap this model ({error}); set poet.target_modules to its linear layer names") from None
    if config.finetuning and config.method in ("poet", "lora"):
        _freeze_base(model, config)
    return model


def _freeze_base(model: nn.Module, config: TrainConfig) -> None:
    keep = {id(p) for p in rotation_parameters(model)}
    keep |= {id(p) for name, p in model.named_parameters() if "lora_" in name}
    for name, module in model.named_modules():
        if config.finetune.train_norms and "norm" in type(module).__name__.lower():
            keep |= {id(p) for p in module.parameters(recurse=False)}
    if config.finetune.train_biases:
        keep |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def _hidden_matrices(model: nn.Module) -> set[int]:
    """2-D weights inside the decoder blocks: Muon's domain (embeddings and head stay with AdamW)."""
    return {id(p) for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and ".layers." in f".{name}"}


def build_optimizers(model: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    opt = config.optim
    betas = (opt.beta1, opt.beta2)
    if config.method == "poet":
        groups = param_groups(model, lr_base=opt.lr, lr_poet=opt.lr_poet, weight_decay=opt.weight_decay)
        return [torch.optim.AdamW(groups, betas=betas)]
    groups = param_groups(model, lr_base=opt.lr, lr_poet=opt.lr, weight_decay=opt.weight_decay)
    if config.method in ("adamw", "lora"):
        return [torch.optim.AdamW(groups, betas=betas)]
    hidden = _hidden_matrices(model)
    muon_params = [p for p in model.parameters() if id(p) in hidden]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
    # "match_rms_adamw" scales Muon's update to AdamW's RMS, so one learning-rate range serves both.
    muon = torch.optim.Muon(muon_params, lr=opt.lr_muon or opt.lr, weight_decay=opt.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return [muon, torch.optim.AdamW([g for g in rest if g["params"]], betas=betas)]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay from 1 to min_lr_ratio at the last step."""
    opt = config.optim
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, config.steps - opt.warmup_steps)
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_schedulers(optimizers, config: TrainConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, config)) for o in optimizers]


def clip_threshold(step: int, last_merge_step: int | None, config: TrainConfig) -> float:
    """The global clip, tightened to 0.1× right after a merge and ramped back to 1× (paper §5)."""
    opt = config.optim
    since = None if last_merge_step is None else step - last_merge_step
    if since is None or since >= opt.merge_clip_steps:
        return opt.grad_clip
    return opt.grad_clip * (0.1 + 0.9 * since / opt.merge_clip_steps)


def merge_due(step: int, config: TrainConfig) -> bool:
    """After optimizer step `step` (1-based count of completed steps)."""
    return config.method == "poet" and step % config.poet.merge_every == 0 and step < config.steps
