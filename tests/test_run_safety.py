"""What `poetlm train` and its companions do with run directories when things go wrong or are misused."""

import json
import os
import pickle
import shutil
import signal
import statistics
from pathlib import Path

import pytest
import torch

from poetlm.cli import main
from poetlm.train import checkpoint as ckpt
from poetlm.train import files, loop
from poetlm.train.config import ConfigError, resolve_config
from poetlm.train.data import read_documents

pytestmark = pytest.mark.slow

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
        "data.seq_len=32", "data.vocab_size=300", "batch_size=4", "eval_tokens=512", "log_every=1",
        "diagnostics_every=1", "poet.block_size=8", "poet.merge_every=2", "progress=false", "optim.warmup_steps=0",
        "eval_every=3", "checkpoint_every=3"]


@pytest.fixture
def tiny(tmp_path):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))

    def overrides(*extra, steps=6):
        return [*TINY, f"data.data={str(corpus)!r}", f"data.cache_dir={str(tmp_path / 'cache')!r}",
                f"out_dir={str(tmp_path / 'runs')!r}", f"steps={steps}", *extra]
    overrides.corpus, overrides.cache, overrides.runs = corpus, tmp_path / "cache", tmp_path / "runs"
    return overrides


def stop_at_step(monkeypatch, step):
    """SIGTERM this process during optimizer step `step` (grad_accum=1): the loop checkpoints there and returns."""
    original, calls = loop.micro_batch_loss, {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "micro_batch_loss", loss_then_signal)


def snapshot(directory):
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_a_resumed_run_keeps_its_tokenizer_and_tokens_when_the_data_changes(tiny, monkeypatch, capsys):
    stop_at_step(monkeypatch, 2)
    stopped = loop.train(resolve_config("tiny", tiny("name='cut'")))
    monkeypatch.undo()
    run_dir = Path(stopped["run_dir"])
    tokenizers = sorted((tiny.cache / "tokenizers").iterdir())
    record = json.loads((run_dir / "data.json").read_text())
    with tiny.corpus.open("a") as f:
        f.write("\n\nA new scene, appended after the run started, with words the tokenizer never saw: zyxxy qwopp.\n")

    # Without its token cache the run cannot get its tokens back from the changed file: refused, nothing touched.
    cache = Path(record["cache_dir"])
    cache.rename(cache.with_name("aside"))
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "changed since this run started" in err and "Restore the original data" in err
    assert snapshot(run_dir) == before

    # With the cache the run goes on, exactly on what it trained on, and says the data changed.
    cache.with_name("aside").rename(cache)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "changed since this run started; its tokens are read from the run's token cache" in capsys.readouterr().err
    assert sorted((tiny.cache / "tokenizers").iterdir()) == tokenizers  # no tokenizer was trained on the new text
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def test_a_resume_refuses_other_data_while_the_runs_own_is_there_and_takes_a_moved_copy(tiny, monkeypatch, tmp_path, capsys):
    stop_at_step(monkeypatch, 2)
    run_dir = Path(loop.train(resolve_config("tiny", tiny("name='moved'")))["run_dir"])
    monkeypatch.undo()
    other = tmp_path / "other.txt"
    other.write_text("Another text entirely, never this run's data.\n\n" * 50)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--data", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"data.data={str(other)!r} is not this run's data" in err and "Resume without --data" in err
    assert snapshot(run_dir) == before  # config.json still names the run's own data
    moved = tmp_path / "moved.txt"
    shutil.copy(tiny.corpus, moved)
    tiny.corpus.rename(tiny.corpus.with_name("gone"))
    assert main(["train", "--resume", str(run_dir), "--data", str(tmp_path / "mvoed.txt")]) == 1  # a typo
    _one_line_error(capsys, "mvoed.txt' does not exist: give the place the run's data moved to")
    assert json.loads((run_dir / "config.json").read_text())["data"]["data"] == str(tiny.corpus)
    assert main(["train", "--resume", str(run_dir), "--data", str(moved)]) == 0
    assert f"{moved} is not the data this run started on ({tiny.corpus.resolve()})" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["data"]["data"] == str(moved)
    moved.unlink()  # gone, not another source: and eval is not a run that goes on
    assert main(["eval", str(run_dir)]) == 0
    assert f"{moved} is no longer there; its tokens are read from the run's token cache" in capsys.readouterr().err
    shutil.rmtree(json.loads((run_dir / "data.json").read_text())["cache_dir"])  # and now the cache too
    assert main(["eval", str(run_dir)]) == 1
    _one_line_error(capsys, f"{moved} is no longer there, and the run's token cache", "--data NEW_PATH")


def test_resuming_a_finished_run_changes_nothing(tiny, capsys):
    summary = loop.train(resolve_config("tiny", tiny("name='done'", steps=3)))
    run_dir = Path(summary["run_dir"])
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "already finished (3 of 3 steps)" in capsys.readouterr().out
    assert snapshot(run_dir) == before


def test_a_run_stopped_during_its_last_step_is_finished_by_its_resume(tiny, monkeypatch, capsys):
    stop_at_step(monkeypatch, 3)
    stopped = loop.train(resolve_config("tiny", tiny("name='last'", steps=3)))
    monkeypatch.undo()
    assert stopped["interrupted"] and stopped["step"] == 3
    run_dir = Path(stopped["run_dir"])
    cut_short = files.temp_path(run_dir / "final")  # as a kill during the finish stage's write_final leaves it
    cut_short.mkdir()
    (cut_short / "model.safetensors").write_bytes(b"cut short")
    capsys.readouterr()

    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "already finished" not in capsys.readouterr().out
    assert all((run_dir / name).is_file() for name in ("summary.json", "report.md", "spectrum.json", "final/config.json"))
    assert not cut_short.exists()
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_ppl" in line]
    assert [r["step"] for r in evals] == [3]  # the finish stage scores the model again without logging it twice
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_ppl"] == pytest.approx(evals[0]["val_ppl"], rel=1e-6)
    # The run's speed and peak, from the session that took its steps (the finishing one took none).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    assert speeds and summary["tokens_per_s"] == pytest.approx(statistics.median(speeds))
    assert summary["peak_mem_mb"] >= max(r["peak_mem_mb"] for r in records if "peak_mem_mb" in r)

    # Now it is finished: a resume changes nothing.
    before = snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "already finished (3 of 3 steps)" in capsys.readouterr().out
    assert snapshot(run_dir) == before


def test_the_logged_lr_of_poet_is_the_rotations_lr(tiny):
    summary = loop.train(resolve_config("tiny", tiny("name='lr'", "optim.lr=1e-2", "optim.lr_poet=2e-3", steps=3)))
    first = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["lr"], first["lr_poet"]) == (1e-2, 2e-3)


def _nan_loss(monkeypatch):
    original = loop.micro_batch_loss
    monkeypatch.setattr(loop, "micro_batch_loss", lambda *a, **k: original(*a, **k) * float("nan"))


def _interrupt_startup(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_data", interrupted)


def _terminate_startup(monkeypatch):
    # raise_signal: to this thread, whose Python handler runs before it returns.
    monkeypatch.setattr(loop, "load_data", lambda *args, **kwargs: signal.raise_signal(signal.SIGTERM))


@pytest.fixture
def unhandled_sigterm_fails():
    """A SIGTERM that poetlm leaves to the default handler fails the test instead of killing pytest."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached no handler of poetlm's: the process would have been killed")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("failure,extra,code,message", [
    (None, ["data.seq_len=100000"], 1, "fewer than seq_len+1=100001"),
    (_nan_loss, [], 1, "non-finite loss (nan) at step 1"),
    (_interrupt_startup, [], 130, "poetlm train: interrupted"),
    (_terminate_startup, [], 143, "poetlm train: interrupted"),
])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tiny, monkeypatch, capsys, unhandled_sigterm_fails,
                                                                          failure, extra, code, message):
    if failure is not None:
        failure(monkeypatch)
    assert main(["train", *tiny("name='early'", *extra)]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tiny.runs / "early").exists()
    monkeypatch.undo()
    summary = loop.train(resolve_config("tiny", tiny("name='early'", steps=3)))
    assert Path(summary["run_dir"]).name == "early"  # not early-2


@pytest.fixture
def finished_run(tiny):
    return Path(loop.train(resolve_config("tiny", tiny("name='exp'", steps=3)))["run_dir"])


def test_eval_scores_a_run_as_it_scored_itself_and_refuses_data_flags_without_data(finished_run, tmp_path, capsys):
    summary = json.loads((finished_run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(finished_run)]) == 0  # batched as the run (batch_size=4) batched its windows
    assert f"validation perplexity: {summary['final_val_ppl']:.3f} " in capsys.readouterr().out
    assert main(["eval", str(finished_run), "--split-seed", "9", "--max-documents", "1"]) == 1
    _one_line_error(capsys, "--split-seed, --max-documents choose how --data is read, and there is no --data")


def test_a_finished_run_whose_newest_checkpoint_is_damaged_is_read_from_its_final_model(finished_run, capsys):
    """An older checkpoint would be an earlier model: eval, export and generate used it, with only a warning."""
    summary = json.loads((finished_run / "summary.json").read_text())
    ckpt.list_checkpoints(finished_run)[-1].write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["eval", str(finished_run)]) == 0
    out, err = capsys.readouterr()
    assert f"validation perplexity: {summary['final_val_ppl']:.3f} " in out and "is damaged; loading instead" in err
    # A later checkpoint than the summary's step (a run extended since, stopped before its finish): final/ is an
    # earlier model than the checkpoint before the damaged one, which is what loads
    later = ckpt.checkpoint_dir(finished_run) / "step_00000009.pt"
    later.write_bytes(b"garbage")
    assert main(["eval", str(finished_run)]) == 1  # the step-3 checkpoint is damaged too: nothing to fall back on
    err = capsys.readouterr().err
    assert "step_00000009.pt" in err and "loading instead" not in err


def test_misplaced_paths_are_named_for_what_they_are(finished_run, tmp_path, capsys):
    assert main(["train", "--resume", str(finished_run / "final")]) == 2
    err = capsys.readouterr().err
    assert f"{finished_run / 'final'} is a model directory, not a poetlm run directory; it is the final model of the run " \
           f"{finished_run}: give that" in err and "unknown config key" not in err
    text = tmp_path / "notes.txt"
    text.write_text("not a tokenizer\n")
    assert main(["train", "--tokenizer", str(text), "--out", str(tmp_path / "runs"), "steps=1"]) == 1
    _one_line_error(capsys, f"{text} is a file, not a tokenizer directory")
    assert main(["finetune", "--model", str(text), "--data", "sotu", "--out", str(tmp_path / "runs"), "steps=1"]) == 1
    _one_line_error(capsys, f"finetune.base_model={str(text)!r} is a file: pass a model directory")


def test_export_never_overwrites_silently_and_never_writes_into_a_run(finished_run, tmp_path, capsys):
    run_dir = finished_run
    config = (run_dir / "config.json").read_bytes()
    for target in (run_dir, run_dir / "exported"):
        for force in ([], ["--force"]):
            assert main(["export", str(run_dir), str(target), *force]) == 1
            assert "the run directory" in capsys.readouterr().err
    assert (run_dir / "config.json").read_bytes() == config and not (run_dir / "exported").exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), str(occupied)]) == 1
    assert "is not empty" in capsys.readouterr().err and sorted(os.listdir(occupied)) == ["notes.txt"]
    assert main(["export", str(run_dir), str(occupied), "--force"]) == 0
    assert (occupied / "config.json").is_file() and (occupied / "notes.txt").read_text() == "mine"

    a_file = tmp_path / "model.bin"
    a_file.write_text("not a directory")
    assert main(["export", str(run_dir), str(a_file)]) == 1
    assert "is an existing file" in capsys.readouterr().err and a_file.read_text() == "not a directory"
    assert main(["export", str(run_dir), str(a_file), "--force"]) == 0
    assert (a_file / "config.json").is_file()

    blocker = tmp_path / "blocker"  # a path under a file: refused before the model loads, not by a traceback after
    blocker.write_text("x")
    assert main(["export", str(run_dir), str(blocker / "sub")]) == 1
    _one_line_error(capsys, "cannot be made a directory")


def test_export_over_a_peft_adapter_directory_leaves_a_loadable_model(finished_run, tmp_path, capsys):
    """Its weights went, its adapter_config.json stayed, and transformers then looked for the adapter's weights."""
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "gone"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    assert main(["export", str(finished_run), str(adapter), "--force"]) == 0
    assert not (adapter / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(adapter).config.vocab_size > 0


def test_generate_keeps_the_end_of_a_prompt_longer_than_the_context(finished_run, capsys):
    assert main(["generate", str(finished_run), "--prompt", "To be or not to be " * 40, "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "keeping its last 28 (context 32 minus --max-new-tokens 4)" in err
    assert main(["generate", str(finished_run), "--max-new-tokens", "32"]) == 1
    assert "use at most 31" in capsys.readouterr().err


def test_a_damaged_checkpoint_fails_eval_export_and_generate_clearly(finished_run, tmp_path, capsys):
    shutil.rmtree(finished_run / "final")  # with it, a finished run is read from its final model instead (test above)
    (only,) = ckpt.list_checkpoints(finished_run)
    data = bytearray(only.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size
    only.write_bytes(bytes(data))
    for command in (["eval", str(finished_run)], ["export", str(finished_run), str(tmp_path / "out")],
                    ["generate", str(finished_run)]):
        capsys.readouterr()
        assert main(command) == 1, command
        out, err = capsys.readouterr()
        assert "does not match its checksum" in err and "perplexity" not in out
    assert not (tmp_path / "out").exists()  # the export made its directory before loading, and took it back


def test_a_run_whose_tokenizer_or_data_record_is_damaged_says_to_restore_them(tiny, monkeypatch, capsys):
    stop_at_step(monkeypatch, 2)
    run_dir = Path(loop.train(resolve_config("tiny", tiny("name='damaged'")))["run_dir"])
    monkeypatch.undo()
    capsys.readouterr()
    tokenizer_file = run_dir / "tokenizer" / "tokenizer.json"
    good = tokenizer_file.read_bytes()
    tokenizer_file.write_text("{ not json")
    assert main(["train", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "it is the run's own tokenizer: restore it" in err and "--tokenizer" not in err
    tokenizer_file.write_bytes(good)
    (run_dir / "data.json").write_text("{")
    assert main(["train", "--resume", str(run_dir)]) == 1
    assert "Restore the file" in capsys.readouterr().err


def test_the_command_line_prints_poetlm_warnings_as_one_line():
    from poetlm import cli

    assert cli._format_warning("token cache x is invalid", UserWarning, "/x/poetlm/train/data.py", 1) == \
        "poetlm: warning: token cache x is invalid\n"
    assert "other.py:3" in cli._format_warning("elsewhere", UserWarning, "/x/other.py", 3, "")



def _one_line_error(capsys, *expected) -> str:
    """The command's stderr ends in one `poetlm: error:` line (no traceback) that says each of `expected`."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("poetlm: error: "), err
    assert all(text in last for text in expected), last
    return last


def _commands(path, tmp_path):
    return [["eval", str(path)], ["generate", str(path), "--max-new-tokens", "4"], ["export", str(path), str(tmp_path / "out")]]


def test_a_damaged_model_directory_fails_eval_export_and_generate_in_one_line(finished_run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "final", model)
    weights = (model / "model.safetensors").read_bytes()
    config = json.loads((model / "config.json").read_text())
    marker = tmp_path / "unpickled"

    class Planted:  # unpickling it would create `marker`
        def __reduce__(self):
            return open, (str(marker), "w")

    damages = [
        (lambda: (model / "model.safetensors").write_bytes(weights[:1000]), "SafetensorError"),
        (lambda: (model / "config.json").write_text(json.dumps({**config, "hidden_size": 64})), "from another model"),
        (lambda: ((model / "model.safetensors").unlink(), (model / "pytorch_model.bin").write_bytes(pickle.dumps(Planted()))),
         "can run arbitrary code; remove the file"),
    ]
    for damage, message in damages:
        damage()
        for command in _commands(model, tmp_path):
            assert main(command) == 1, command
            _one_line_error(capsys, message, "save the model again")
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert main(["generate", str(finished_run), "--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device torch knows: use auto, cpu, cuda" in capsys.readouterr().err
    # A device type this machine lacks used to reach the checkpoint loader, which called the files damaged
    for absent in ("mps", "cuda:7", "meta"):
        assert main(["eval", str(finished_run), "--device", absent]) == 2, absent
        err = capsys.readouterr().err
        assert f"--device '{absent}'" in err and "damaged" not in err and "use --device cpu" in err, err


def test_a_model_directory_without_tokenizer_files_is_refused_by_eval_generate_and_train(tiny, tmp_path, capsys):
    """From a GPT-2 config.json alone transformers builds a tokenizer that encodes every text to no tokens: eval
    scored end-of-text tokens only, generate printed an empty line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    weights_only = tmp_path / "weights-only"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(weights_only)
    for command in (["eval", str(weights_only), "--data", str(tiny.corpus), "--tokens", "512", "--cache-dir", str(tiny.cache)],
                    ["generate", str(weights_only), "--max-new-tokens", "4"]):
        assert main(command) == 1, command
        _one_line_error(capsys, f"{weights_only} has no tokenizer files", "restore the tokenizer files")
    assert main(["train", "--tokenizer", str(weights_only), *tiny("name='notok'")]) == 1
    _one_line_error(capsys, f"{weights_only} has no tokenizer files", "pass a directory written by save_pretrained")


def test_export_force_over_a_poetlm_save_leaves_only_the_exported_model(finished_run, tmp_path):
    import poetlm
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    target = tmp_path / "target"
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    poetlm.save_pretrained(poetlm.poetize(other, poetlm.POETConfig(block_size=8)), target, max_shard_size="20KB")
    assert main(["export", str(finished_run), str(target), "--force"]) == 0
    assert not {"poetlm_config.json", "poetlm_state.safetensors", "model.safetensors.index.json"} & set(os.listdir(target))
    with pytest.raises(poetlm.LoadError, match="plain \\(or merged\\) model directory"):
        poetlm.from_pretrained(target)
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 2  # the run's model


def _reads_final(run_dir, tmp_path, capsys, expected_eval):
    for command in _commands(run_dir, tmp_path)[1:]:
        assert main(command) == 0, command
        assert f"poetlm: note: no checkpoint left: loading {run_dir / 'final'}" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out")
    assert main(["eval", str(run_dir)]) == 0
    assert capsys.readouterr().out == expected_eval  # the same model, on the run's own validation data


def test_a_run_without_checkpoints_is_read_by_its_final_model_or_said_to_have_stopped_early(finished_run, tmp_path, capsys):
    assert main(["eval", str(finished_run)]) == 0
    expected_eval = capsys.readouterr().out
    checkpoints = ckpt.checkpoint_dir(finished_run)
    for checkpoint in checkpoints.iterdir():
        checkpoint.unlink()
    _reads_final(finished_run, tmp_path, capsys, expected_eval)
    checkpoints.rmdir()  # data.json still marks the directory as a run
    _reads_final(finished_run, tmp_path, capsys, expected_eval)
    shutil.rmtree(finished_run / "final")  # as a run killed before its first checkpoint leaves it
    for command in _commands(finished_run, tmp_path):
        assert main(command) == 1, command
        _one_line_error(capsys, "no checkpoint in", "the run stopped before its first one")


def test_a_missing_tokenizer_says_to_restore_it_not_to_train_one(finished_run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "final", model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    shutil.rmtree(finished_run / "tokenizer")
    for path, fix in ((finished_run, "it is the run's own tokenizer: restore it"),
                      (model, "restore the tokenizer files from a copy of the directory, or export the model again")):
        for command in _commands(path, tmp_path):
            assert main(command) == 1, command
            assert "--tokenizer" not in _one_line_error(capsys, fix)


def test_eval_reads_a_hub_stream_with_max_documents_and_says_so_when_it_is_missing(finished_run, tmp_path, capsys):
    assert main(["eval", str(finished_run), "--data", "hf:allenai/c4:en"]) == 1
    assert "data.max_documents" not in _one_line_error(capsys, "e.g. --max-documents 2000000")
    pytest.importorskip("datasets")
    local = tmp_path / "hf"
    local.mkdir()
    docs = read_documents("shakespeare", max_documents=300)
    (local / "train.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    scored = []
    for budget in ([], ["--max-documents", "100"]):
        assert main(["eval", str(finished_run), "--data", f"hf:{local}", "--tokens", "1000000", *budget]) == 0
        scored.append(int(capsys.readouterr().out.split(" over ")[1].split()[0]))
    assert scored[1] < scored[0]  # the validation split of the first 100 documents, not of all 300


def test_eval_and_report_refuse_a_file_as_their_directory_in_one_line(finished_run, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    for path in (a_file, a_file / "sub"):
        assert main(["eval", str(finished_run), "--data", "sotu", "--cache-dir", str(path)]) == 2
        assert f"config error: --cache-dir={str(path)!r} cannot be made a directory" in capsys.readouterr().err
        assert main(["report", str(finished_run), "--out", str(path)]) == 1
        _one_line_error(capsys, f"--out={str(path)!r} cannot be made a directory", "choose another --out")
    assert a_file.read_text() == "mine"


def test_generate_reads_a_literal_end_of_text_in_the_prompt_as_text(finished_run, capsys):
    prompt = "Hello<|endoftext|>World"
    assert main(["generate", str(finished_run), "--temperature", "0", "--max-new-tokens", "5", "--prompt", prompt]) == 0
    assert capsys.readouterr().out.startswith(prompt)


def test_generate_stops_at_the_tokenizers_end_of_text_in_a_model_saved_with_llamas_default(finished_run, tmp_path,
                                                                                            monkeypatch, capsys):
    """Models saved before the fix name LLaMA's eos (2: a byte token here, '"'); generate stops at the
    tokenizer's end-of-text instead, and keeps a model's own stops when they include it."""
    from transformers import AutoTokenizer, GenerationMixin

    assert main(["export", str(finished_run), str(tmp_path / "old")]) == 0
    for name in ("config.json", "generation_config.json"):
        path = tmp_path / "old" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "bos_token_id": 1, "eos_token_id": 2}))
    asked = []
    original = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", lambda self, *a, **k: asked.append(k) or original(self, *a, **k))
    for directory in (tmp_path / "old", finished_run):
        assert main(["generate", str(directory), "--temperature", "0", "--max-new-tokens", "3", "--prompt", "A"]) == 0
    eos = AutoTokenizer.from_pretrained(finished_run / "tokenizer").eos_token_id
    assert asked[0]["eos_token_id"] == eos != 2
    assert "eos_token_id" not in asked[1]  # the run's model names the tokenizer's own: nothing to replace
    capsys.readouterr()


def _stopped_run(tiny, monkeypatch, name, *extra, step=4):
    """A run stopped by SIGTERM during step `step` (checkpoints at 3 and `step`), for resume tests."""
    stop_at_step(monkeypatch, step)
    run_dir = Path(loop.train(resolve_config("tiny", tiny(f"name={name!r}", *extra)))["run_dir"])
    monkeypatch.undo()
    return run_dir


def test_a_checkpoint_of_another_run_is_refused_by_resume_eval_export_and_generate(tiny, monkeypatch, tmp_path, capsys):
    ours = _stopped_run(tiny, monkeypatch, "ours")
    twin = _stopped_run(tiny, monkeypatch, "twin", step=5)  # the same settings and data: still another run
    shutil.copy(ckpt.list_checkpoints(twin)[-1], ckpt.checkpoint_dir(ours))
    shutil.copy(ckpt.checksum_path(ckpt.list_checkpoints(twin)[-1]), ckpt.checkpoint_dir(ours))
    capsys.readouterr()
    before = snapshot(ours)
    for command in (["train", "--resume", str(ours)], *_commands(ours, tmp_path)):
        assert main(command) == 1, command
        _one_line_error(capsys, "step_00000005.pt belongs to another run", "Remove it")
    assert snapshot(ours) == before and not (tmp_path / "out").exists()
    for path in ckpt.list_checkpoints(ours)[-1], ckpt.checksum_path(ckpt.list_checkpoints(ours)[-1]):
        path.unlink()
    # Checkpoints written before they recorded their run resume as they did.
    for path in ckpt.list_checkpoints(ours):
        saved = torch.load(path, weights_only=True)
        del saved["run"], saved["step"], saved["rng"]
        path.unlink()
        ckpt.save_checkpoint(ours, int(path.stem.split("_")[1]), saved, keep=3)
    assert main(["train", "--resume", str(ours)]) == 0


@pytest.mark.parametrize("edit,named", [
    ({"data": {"seq_len": 16}}, "data.seq_len 32 → 16"),
    ({"seed": 7, "batch_size": 2}, "batch_size 4 → 2, poet.seed 0 → 7, seed 0 → 7"),
    ({"method": "adamw"}, "method 'poet' → 'adamw'"),
    ({"model": {"hidden_size": 64}}, "model.hidden_size 32 → 64"),
])
def test_an_edited_run_config_is_refused_on_resume_naming_the_changed_keys(tiny, monkeypatch, capsys, edit, named):
    run_dir = _stopped_run(tiny, monkeypatch, "edited")
    original = json.loads((run_dir / "config.json").read_text())
    edited = json.loads(json.dumps(original))
    for key, value in edit.items():
        edited[key] = {**edited[key], **value} if isinstance(value, dict) else value
    if "seed" in edit:
        edited["poet"]["seed"] = edit["seed"]
    (run_dir / "config.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 1
    _one_line_error(capsys, f"changed since step_00000004.pt was written ({named})", "Restore those values")


def test_a_run_another_process_holds_is_refused_and_free_again_when_that_process_ends(tiny, monkeypatch, capsys):
    import subprocess
    import sys

    run_dir = _stopped_run(tiny, monkeypatch, "held")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from poetlm.train.files import exclusive\n"
                               f"with exclusive({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir), "steps=7"]) == 1
        _one_line_error(capsys, f"{run_dir} is in use by another poetlm process (PID {holder.pid})")
        assert snapshot(run_dir) == before  # config.json kept its steps
        with pytest.raises(loop.TrainingError, match="in use by another poetlm process"):
            loop.train(resume=run_dir)
    finally:
        holder.kill()
        holder.wait()
    with files.exclusive(run_dir), files.exclusive(run_dir):  # a killed holder leaves nothing behind; nesting holds once
        pass
    assert main(["train", "--resume", str(run_dir)]) == 0


@pytest.mark.parametrize("flags, named", [(["--name", "renamed"], "name='renamed'"), (["--out", "elsewhere"], "out_dir="),
                                          (["--tokenizer", "/nowhere/tokenizer"], "data.tokenizer='/nowhere/tokenizer'")])
def test_a_resume_refuses_a_new_name_place_or_tokenizer_it_would_only_record(tiny, monkeypatch, capsys, flags, named):
    run_dir = _stopped_run(tiny, monkeypatch, "placed")
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), *flags]) == 2  # a config error
    err = capsys.readouterr().err
    assert "Traceback" not in err and named in err and ("drop --tokenizer" in err or "drop --name / --out" in err), err
    assert snapshot(run_dir) == before
    assert main(["train", "--resume", str(run_dir), "--name", "placed", "--out", str(tiny.runs)]) == 0  # its own values


def test_steps_and_bookkeeping_may_change_on_resume(tiny, monkeypatch):
    run_dir = _stopped_run(tiny, monkeypatch, "extended")
    config = json.loads((run_dir / "config.json").read_text())
    config.update(steps=8, eval_every=2, log_every=2, checkpoint_every=4, keep_checkpoints=3, progress=True,
                  logging={**config["logging"], "tensorboard": False})
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_steps_below_the_checkpoints_step_are_refused_on_resume_and_config_json_keeps_its_steps(tiny, monkeypatch, capsys):
    run_dir = _stopped_run(tiny, monkeypatch, "shortened")
    reached = torch.load(ckpt.list_checkpoints(run_dir)[-1], weights_only=True)["step"]
    assert reached == 4
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "steps=2"]) == 2
    message = ("steps=2 is below step 4, where this run's checkpoint step_00000004.pt is: a run cannot be shortened. "
               "Resume with steps of at least 4 (steps=4 ends it there)")
    assert capsys.readouterr().err.strip() == f"poetlm: config error: {message}"
    assert snapshot(run_dir) == before  # config.json still says the run's steps; nothing written, nothing removed
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "steps": 3}))  # an edit, as the docs allow for steps
    edited = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"^steps=3 is below step 4, where this run's checkpoint step_00000004.pt is"):
        loop.train(resume=run_dir)
    assert snapshot(run_dir) == edited
    assert main(["train", "--resume", str(run_dir), f"steps={reached}"]) == 0  # the checkpoint's own step: it finishes there
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == json.loads((run_dir / "config.json").read_text())["steps"] == 4


def test_a_checkpoint_that_does_not_fit_the_run_is_a_one_line_error(tiny, monkeypatch, capsys):
    run_dir = _stopped_run(tiny, monkeypatch, "misfit")
    other = _stopped_run(tiny, monkeypatch, "other", "method='adamw'", "model.hidden_size=64")
    for path in ckpt.list_checkpoints(run_dir):  # another run's states, this run's identity (past the identity check)
        saved, theirs = torch.load(path, weights_only=True), torch.load(ckpt.list_checkpoints(other)[-1], weights_only=True)
        saved.update(model=theirs["model"], optimizers=theirs["optimizers"])
        del saved["step"], saved["rng"]
        ckpt.save_checkpoint(run_dir, int(path.stem.split("_")[1]), saved, keep=3)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 1
    _one_line_error(capsys, "step_00000004.pt does not fit the model and optimizers this run builds",
                    "1 optimizer states, the run builds 2")
    assert main(["eval", str(run_dir)]) == 1
    _one_line_error(capsys, "step_00000004.pt does not fit", "size mismatch")


def test_unreadable_checkpoint_bytes_are_damage_and_the_older_checkpoint_is_used(tiny, monkeypatch, capsys):
    run_dir = _stopped_run(tiny, monkeypatch, "noise")
    newest = ckpt.list_checkpoints(run_dir)[-1]
    for damage, reason in [(os.urandom(4096), "UnpicklingError: Unsupported operand"), (b"", "EOFError: the file ends")]:
        newest.write_bytes(damage)
        files.write_text(ckpt.checksum_path(newest), f"{files.sha256_file(newest)}  {newest.name}\n")  # a matching checksum
        capsys.readouterr()
        assert ckpt.load_checkpoint(run_dir)["step"] == 3
        err = capsys.readouterr().err
        assert f"poetlm: warning: {newest.name} is damaged or unreadable ({reason}" in err, err
        assert "arbitrary code" not in err


def test_export_force_removes_another_models_weights_of_any_format(finished_run, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    target = tmp_path / "target"
    target.mkdir()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    other.config.save_pretrained(target)
    for name in ("pytorch_model.bin", "model.pt", "weights.pth"):  # what from_pretrained(use_safetensors=False) and others load
        torch.save(other.state_dict(), target / name)
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    (target / "notes.txt").write_text("mine")
    assert main(["export", str(finished_run), str(target), "--force"]) == 0
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors", "notes.txt",
                                          "tokenizer.json", "tokenizer_config.json"]
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 2  # nothing else loads instead
    assert (target / "notes.txt").read_text() == "mine"
