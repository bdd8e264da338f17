"""Command line: poetlm train | finetune | eval | export | generate | report | config."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

from .config import POETWarning
from .train.checkpoint import CheckpointError
from .train.config import (METHODS, ConfigError, ConfigWarning, DataConfig, closest_keys, config_value, load_config, make_dir,
                           override_config, parse_overrides, preset_names, resolve_config, save_config)
from .train.data import DataError
from .train.files import DirectoryInUse, exclusive
from .train.metrics import format_ppl

class CommandError(RuntimeError):
    """A command cannot do what was asked as asked; the message says why and what to do instead."""


TRAIN_SHORTCUTS = {  # flag -> config key: the most used overrides get their own flags
    "method": "method", "data": "data.data", "tokenizer": "data.tokenizer", "steps": "steps",
    "name": "name", "out": "out_dir", "seed": "seed", "device": "device", "model_config": "model.hf_config",
}


def at_least(low: int | float, kind=int, above: bool = False):
    """An argparse type: a finite number of `kind` that is at least `low` (`above`: greater than it). Also the
    benchmark scripts' (a 0 given for a count would otherwise be read as unset by an `x or default`)."""
    bound = f"{'greater than' if above else 'of at least'} {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value):  # nan compares as no number, and inf samples uniformly (as temperature)
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: use a value {bound}")
        if value < low or above and value == low:
            raise argparse.ArgumentTypeError(f"{text} is {'not above' if above else 'below'} {low}: use a value {bound}")
        return value
    return parse


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain a causal LM (LLaMA, or any HF architecture via --model-config) with POET, AdamW or Muon",
                       description="Train from a preset or TOML config; any config field can be overridden as section.key=value. "
                                   "Every key and what it does: poetlm config.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-3 poet.block_size=64")
    p.add_argument("--config", "--preset", dest="config",  # no default: --resume must tell whether it was given
                   help=f"preset name ({', '.join(preset_names())}) or path to a TOML file (default: tiny)")
    p.add_argument("--method", choices=["poet", "poet-paper", "adamw", "muon"],
                   help="poet (default: rotations folded every step), poet-paper (the paper's recipe), adamw, muon")
    p.add_argument("--data",
                   help="bundled corpus (sotu, shakespeare), local .txt/.jsonl/.parquet file or directory, or hf:NAME[:CONFIG]")
    p.add_argument("--tokenizer", help="HF tokenizer directory (default: train a byte-level BPE on the training split)")
    p.add_argument("--model-config", metavar="PATH_OR_NAME",
                   help="architecture from any HF causal-LM config: a config.json or its directory, a model type "
                        "(qwen2, mistral, gpt2, ...) or a hub id; the preset's model sizes apply (default: LLaMA)")
    p.add_argument("--steps", type=int)
    p.add_argument("--name", help="run name (directory under --out)")
    p.add_argument("--out", help="parent directory of runs (default: runs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where its last checkpoint left it")
    _output_flags(p)


def _output_flags(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (otherwise a bar on a terminal, one plain line per log interval elsewhere)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML (a file --config reads back as the same config) and exit")


def _print_config(config) -> int:
    from .train.config_text import to_toml

    print(to_toml(config), end="")
    return 0


def _cmd_train(args) -> int:
    from .train.loop import train

    if args.resume:
        return _resume(args)
    config = resolve_config(args.config or "tiny", [*shortcut_overrides(args), *args.overrides])
    if args.config == "finetune" and not config.finetuning and not args.print_config:  # it would pretrain a placeholder from scratch
        raise ConfigError("the finetune preset finetunes a model: run poetlm finetune --model DIR (or set "
                          "finetune.base_model); to pretrain, choose another preset (tiny, small, llama-60m, …)")
    return _print_config(config) if args.print_config else _finish(train(config))


def _resume(args) -> int:
    """Continue a run with its saved config, in which the overrides may change what RESUME_ADJUSTABLE allows."""
    from .train.loop import train
    from .train.checkpoint import list_checkpoints
    from .train.data import check_resume_data
    from .train.runs import FIXED_ON_RESUME, MOVABLE_PLACES, RESUME_ADJUSTABLE, absolute_places, check_steps, refuse_new_places

    if args.config is not None:
        raise ConfigError("--resume continues a run with the config saved in it; drop --config (or start a new run with it)")
    parsed = parse_overrides([*shortcut_overrides(args), *args.overrides])
    refused = [key for key in (".".join(keys) for keys, _ in parsed) if key not in RESUME_ADJUSTABLE and not key.startswith("logging.")]
    if refused:
        raise ConfigError(f"--resume cannot change {', '.join(refused)}: they define what the run trains (start a new run "
                          f"to change them). A resume may change {', '.join(sorted(RESUME_ADJUSTABLE - set(FIXED_ON_RESUME)))} "
                          "and logging.*")
    path = Path(args.resume) / "config.json"
    config = recorded = load_config(path)
    if parsed:
        config = override_config(config, parsed)
        # A new place is recorded absolute, as a new run records its places; the run's other values stay as recorded.
        absolute, moved = absolute_places(config), [keys for keys, _ in parsed if ".".join(keys) in MOVABLE_PLACES]
        config = override_config(config, [(keys, config_value(absolute, ".".join(keys))) for keys in moved])
        refuse_new_places(recorded, config, Path(args.resume))
        if config.data.data != recorded.data.data:
            check_resume_data(Path(args.resume), recorded.data.data, config.data.data)
    checkpoints = list_checkpoints(Path(args.resume))
    if checkpoints:  # before config.json is written; the loop checks the checkpoint it resumes (an older one if this is damaged)
        check_steps(config, checkpoints[-1])
    if args.print_config:
        return _print_config(config)
    # Held from before config.json is written (rank 0 of a torchrun job; train() holds it again, for every caller).
    with exclusive(args.resume) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        if parsed:  # saved for this session and the next ones, as an edit of config.json would be (raising steps extends the run)
            save_config(config, path)
        return _finish(train(resume=args.resume))


def shortcut_overrides(args) -> list[tuple[str, object]]:
    """--method, --steps, … as (key, value) overrides, before the explicit KEY=VALUE ones; a key set both
    ways is refused (one of the two would be dropped without a word)."""
    given = [(flag, key, getattr(args, flag)) for flag, key in TRAIN_SHORTCUTS.items() if getattr(args, flag, None) is not None]
    if args.no_progress:
        given.append(("no_progress", "progress", False))
    explicit = {item.partition("=")[0].strip() for item in args.overrides}
    for flag, key, _ in given:
        if key in explicit:
            raise ConfigError(f"--{flag.replace('_', '-')} and {key}=… both set {key}: give it once")
    return [(key, value) for _, key, value in given]


def _finish(summary: dict) -> int:
    if summary.get("interrupted"):
        return 128 + summary["signal"]
    if summary.get("rank", 0) == 0 and summary.get("final_val_ppl") is not None:
        print(f"final validation perplexity: {format_ppl(summary['final_val_ppl'], 3)}")
        print(f"run directory: {summary['run_dir']} (report: {Path(summary['run_dir']) / 'report.md'})")
        print(f"trained model: {Path(summary['run_dir']) / 'final'} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="finetune a pretrained causal LM with POET (or LoRA / full finetuning to compare)",
                       description="Wraps the model with init='keep' (the wrapped model starts exactly at the base), "
                                   "trains the rotations, reports perplexity before and after, and writes a run directory "
                                   "with the finetuned model in final/ (poet-paper also writes a replayable adapter.safetensors).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr_poet=1e-3 finetune.train_norms=true")
    p.add_argument("--model", required=True,
                   help="local model directory (save_pretrained / poetlm export) or a hub id (needs network)")
    p.add_argument("--data", required=True,
                   help="bundled corpus, local .txt/.jsonl/.parquet file or directory, or hf:NAME[:CONFIG]")
    p.add_argument("--config", "--preset", dest="config", default="finetune", help="preset or TOML file (default: finetune)")
    p.add_argument("--method", choices=["poet", "poet-paper", "lora", "adamw", "muon"], default=None,
                   help="poet (default), poet-paper (reparameterized; writes a replayable adapter), lora (peft), "
                        "adamw / muon (full finetuning)")
    p.add_argument("--steps", type=int)
    p.add_argument("--name")
    p.add_argument("--out")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    _output_flags(p)


def _cmd_finetune(args) -> int:
    """`poetlm train` on a pretrained model, with the finetuning preset."""
    from .train.loop import train
    from .train.checkpoint import is_run_dir
    from .train.runs import final_model_dir

    model = Path(args.model)
    if is_run_dir(model):  # eval, export and generate take a run directory: take it here too, by its trained model
        final = final_model_dir(model, "finetuning")
        if final is None:
            raise CommandError(f"{model} is a run directory without final/ (the run has not finished): finish it "
                               f"(poetlm train --resume {model}) or export its last checkpoint (poetlm export {model} DIR) "
                               "and pass --model DIR")
        args.model = str(final)
    overrides = [("finetune.base_model", args.model), *shortcut_overrides(args), *args.overrides]
    config = resolve_config(args.config, overrides)
    return _print_config(config) if args.print_config else _finish(train(config))


def _cmd_eval(args) -> int:
    from .train.data import load_run_data, prepare_data
    from .train.parallel import pick_device
    from .train.evaluate import perplexity
    from .train.loop import autocast_dtype
    from .train.runs import data_options, load_any_model
    from .train.models import check_context, context_length

    unused = [flag for flag, value in (("--split-seed", args.split_seed), ("--cache-dir", args.cache_dir),
                                       ("--max-documents", args.max_documents)) if value is not None]
    if args.data is None and unused:
        verb = "chooses" if len(unused) == 1 else "choose"
        raise CommandError(f"{', '.join(unused)} {verb} how --data is read, and there is no --data: eval then scores the "
                           "run's own validation tokens, exactly as the run did. Pass --data, or drop them")
    device = pick_device(args.device, setting="--device {}")
    model, tokenizer, config = load_any_model(args.path, device)
    if args.data is None and config is None:
        raise DataError("an exported model directory has no training data attached: pass --data (e.g. --data sotu)")
    source = args.data or config.data.data
    context = context_length(model)
    seq_len = args.seq_len or (config.data.seq_len if config else min(256, context or 256))
    check_context(model, seq_len, "--seq-len {}", args.path)
    if args.data is None:  # the run's own validation tokens, exactly
        data = load_run_data(Path(args.path), source, **data_options(config))
    else:
        tokenizer_dir = Path(args.path) / "tokenizer" if config else Path(args.path)
        cache_dir = Path(args.cache_dir or (config.data.cache_dir if config else DataConfig.cache_dir)).expanduser()
        make_dir(cache_dir, "--cache-dir")
        split_seed = args.split_seed if args.split_seed is not None else config.data.resolved_split_seed(config.seed) if config else 0
        data = prepare_data(source, tokenizer=str(tokenizer_dir), vocab_size=len(tokenizer), cache_root=cache_dir,
                            val_fraction=config.data.val_fraction if config else 0.05, split_seed=split_seed,
                            max_documents=args.max_documents, documents_option="--max-documents {}")
    max_tokens = args.tokens or (config.eval_tokens if config else None)
    amp = autocast_dtype(config, device) if config else None  # a bf16 run is scored as it scored itself
    batch_size = args.batch_size or (config.batch_size if config else 8)  # a run's own: its windows batched as it scored them
    result = perplexity(model, data.val, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, device=device,
                        autocast_dtype=amp)
    print(f"validation perplexity: {format_ppl(result['val_ppl'], 3)} (loss {result['val_loss']:.4f} over {result['val_tokens']} tokens of {source})")
    return 0


def _check_export_target(out: Path, force: bool) -> None:
    """Never into a run directory (it would destroy the run's config.json); nothing overwritten without --force."""
    from .train.checkpoint import is_run_dir

    inside = next((p for p in (out.resolve(), *out.resolve().parents) if is_run_dir(p)), None)
    if inside is not None:
        raise CommandError(f"{out} is {'inside ' if inside != out.resolve() else ''}the run directory {inside}: exporting "
                           "there would overwrite the run's own files. Export to a directory outside it")
    if out.is_file() and not force:
        raise CommandError(f"{out} is an existing file; export writes a directory. Choose another path, or pass --force to replace it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CommandError(f"{out} is not empty; export into a new or empty directory, or pass --force to overwrite files in it")


def _cmd_export(args) -> int:
    from .model import export_dense
    from .train.data import warn_if_reloaded_otherwise
    from .serialization import remove_poetlm_files
    from .train.runs import load_any_model

    out = Path(args.out_dir)
    _check_export_target(out, args.force)
    created = [path for path in (out, *out.parents) if not path.exists()]  # deepest first
    if created:  # before the model loads (minutes for a large one), not at the save after it (a file --force replaces)
        make_dir(out, "OUT_DIR", CommandError)
    try:
        model, tokenizer, _ = load_any_model(args.run_dir)
    except BaseException:
        for directory in created:  # what this command made, and nothing else
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    if out.is_file():
        out.unlink()
    dense = model.merge_and_unload() if hasattr(model, "merge_and_unload") else export_dense(model)  # LoRA via peft
    if out.is_dir():  # --force over another model: none of its weights may stay beside (or load instead of) this one
        remove_poetlm_files(out, all_weights=True)
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)
    warn_if_reloaded_otherwise(out, tokenizer)
    print(f"exported a dense {type(dense).__name__} to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_generate(args) -> int:
    from .train.models import context_length
    from .train.parallel import pick_device
    from .train.runs import load_any_model

    device = pick_device(args.device, setting="--device {}")
    model, tokenizer, _ = load_any_model(args.path, device)
    torch.manual_seed(args.seed)
    # As training read its text: a literal "<|endoftext|>" in the prompt is text, not the end of a document.
    ids = tokenizer(args.prompt, return_tensors="pt", split_special_tokens=True).input_ids.to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    context = context_length(model)
    if context is not None:
        if args.max_new_tokens >= context:
            raise CommandError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in the model's "
                               f"context of {context} tokens; use at most {context - 1}")
        room = context - args.max_new_tokens
        if ids.shape[1] > room:
            print(f"poetlm: note: the prompt has {ids.shape[1]} tokens; keeping its last {room} (context {context} "
                  f"minus --max-new-tokens {args.max_new_tokens})", file=sys.stderr)
            ids = ids[:, -room:]
    # The tokenizer's end-of-text always ends the text. Models saved by poetlm before 2026-11-30 name LLaMA's
    # default eos instead (id 2, a byte token such as '"'): for them the tokenizer's id replaces it.
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    eos = {} if tokenizer.eos_token_id in stops else {"eos_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None, top_k=args.top_k,
                             pad_token_id=tokenizer.eos_token_id, **eos)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def _cmd_config(args) -> int:
    from .train.config_text import describe_config

    print(describe_config(args.config, args.method), end="")
    return 0


def _cmd_report(args) -> int:
    from .train.report import write_report

    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) if len(args.run_dirs) == 1 else Path("report"))
    path = write_report([Path(r) for r in args.run_dirs], out)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poetlm", description="Train and finetune language models with POET.")
    sub = parser.add_subparsers(dest="command", required=False)
    _train_parser(sub)
    _finetune_parser(sub)
    p = sub.add_parser("eval", help="validation perplexity of a run or an exported model")
    p.add_argument("path", help="run directory or model directory")
    p.add_argument("--data", help="evaluate on this data instead of the run's own validation split")
    p.add_argument("--tokens", type=at_least(1), default=None,
                   help="predicted tokens to score (default: the run's eval_tokens, or the whole validation split)")
    p.add_argument("--seq-len", type=at_least(2), default=None,
                   help="tokens per scored window (default: the run's data.seq_len, else 256 or the model's context if shorter)")
    p.add_argument("--batch-size", type=at_least(1), default=None,
                   help="windows scored at once (default: the run's batch_size, else 8)")
    p.add_argument("--split-seed", type=int, help="with --data: the seed of its train/validation split (default: the "
                   "run's, or 0 for a model directory; a finetune's is data.split_seed, which follows its seed)")
    p.add_argument("--cache-dir", help="with --data: where its tokens are cached (default: the run's data.cache_dir, "
                   f"or {DataConfig.cache_dir})")
    p.add_argument("--max-documents", type=at_least(1), metavar="N",
                   help="with --data: read at most its first N documents (default: all; a hub stream needs it)")
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("export", help="merge a POET run into a plain HF model directory")
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="a new or empty directory (never inside a run directory)")
    p.add_argument("--force", action="store_true", help="overwrite the files of a non-empty out_dir, or replace a file there")
    p = sub.add_parser("generate", help="sample text from a run or an exported model")
    p.add_argument("path")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=at_least(1), default=60)
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.8, help="0: greedy decoding")
    p.add_argument("--top-k", type=at_least(0), default=50, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("report", help="markdown + PNG comparison of runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", help="output directory (default: the run directory for one run, ./report for several; "
                   "never another run's directory)")
    p = sub.add_parser("config", help="every config key with its default and what it does (set keys in a TOML file or as KEY=VALUE)")
    p.add_argument("--config", "--preset", dest="config", default="tiny", help="show the values of this preset or TOML file (default: tiny)")
    p.add_argument("--method", choices=METHODS, help="show the values under this method (default: the preset's)")
    return parser


def _settings_hint(extra: list[str], words: list[str]) -> str:
    """For a setting given as a flag (--lr 1e-3, --optim.lr=3e-3): how to give it, as KEY=VALUE."""
    flag = next((item for item in extra if item.startswith("--")), None)
    if flag is None:
        return ""
    name, _, value = flag[2:].partition("=")
    if not value:  # --lr 1e-3: argparse took the value for an override of its own
        after = words.index(flag) + 1
        following = words[after:after + 1]
        value = following[0] if following and not following[0].startswith("-") and "=" not in following[0] else "VALUE"
    close = closest_keys(name.replace("-", "_"))
    example = f"{close[0]}={value}" if close else "optim.lr=3e-3"
    return f"; settings are given as KEY=VALUE, e.g. {example} (poetlm config lists the keys)"


_plain_format = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """poetlm's own warnings as one line for the command's user (no source file, line number and code)."""
    if "poetlm" in Path(filename).parts or issubclass(category, POETWarning):
        return f"poetlm: warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


COMMANDS = {"train": _cmd_train, "finetune": _cmd_finetune, "eval": _cmd_eval, "export": _cmd_export, "generate": _cmd_generate, "report": _cmd_report,
            "config": _cmd_config}


def main(argv: list[str] | None = None) -> int:
    from .adapter import AdapterError
    from .serialization import LoadError
    from .train.loop import TrainingError
    from .train.models import ModelError
    from .train.report import ReportError

    warnings.formatwarning = _format_warning
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its per-file loading and saving bars, around poetlm's own output
    parser = build_parser()
    # KEY=VALUE overrides may come before or after flags; argparse alone stops collecting them at the first flag.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}{_settings_hint(extra, argv or sys.argv[1:]) if hasattr(args, 'overrides') else ''}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:  # `poetlm` alone: show what there is
        parser.print_help()
        return 0
    handler = COMMANDS[args.command]
    # Under torchrun every process reads the same command: one of them says what is wrong with its settings.
    rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    echo = rank != "0"
    if echo:
        warnings.filterwarnings("ignore", category=ConfigWarning)
    which = f" (rank {rank} of {world})" if world > 1 else ""  # the others' errors may differ, or only say they stopped
    try:
        return handler(args)
    except ConfigError as error:
        if not echo:
            print(f"poetlm: config error: {error}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, LoadError, TrainingError, ReportError, AdapterError, ModelError, CommandError,
            DirectoryInUse) as error:
        print(f"poetlm: error{which}: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from .train.parallel import peer_stopped

        if world == 1 or not peer_stopped(error):
            raise
        print(f"poetlm: rank {rank} of {world} stops: another process of this job stopped (its error is above, or, "
              "if it was killed, in torchrun's summary below)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # outside the step loop (whose handler checkpoints first): stop without a traceback
        print(f"\npoetlm {args.command}: interrupted", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)  # as the step loop: SIGINT 130, SIGTERM (loop.Terminated) 143


if __name__ == "__main__":
    sys.exit(main())
