"""torchrun data parallelism on CPU (gloo): same global batch, same losses; identical replicas after merges."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poetlm.cli import main
from poetlm.train import checkpoint as ckpt
from poetlm.train.data import read_documents
from poetlm.train.runs import load_run_model

pytestmark = pytest.mark.slow

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
        "data.seq_len=32", "data.vocab_size=300", "batch_size=4", "eval_tokens=512", "log_every=1",
        "diagnostics_every=1", "poet.block_size=8", "poet.merge_every=2", "progress=false", "steps=6",
        "eval_every=3", "checkpoint_every=3"]


def command(tmp_path, name, nproc, *extra):
    common = [*TINY, f"data.data={str(tmp_path / 'plays.txt')!r}", f"data.cache_dir={str(tmp_path / 'cache')!r}",
              f"out_dir={str(tmp_path / 'runs')!r}", f"name={name!r}", *extra]
    if nproc == 1:
        return [sys.executable, "-m", "poetlm", "train", *common]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "poetlm", "train", *common]


def run(tmp_path, name, nproc, *extra):
    result = subprocess.run(command(tmp_path, name, nproc, *extra), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    run_dir = tmp_path / "runs" / name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], json.loads((run_dir / "summary.json").read_text()), result.stdout


@pytest.mark.parametrize("method", ["poet", "poet-paper", "adamw"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, method):
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    one_losses, one, _ = run(tmp_path, "one", 1, f"method={method!r}", "grad_accum=2")
    two_losses, two, stdout = run(tmp_path, "two", 2, f"method={method!r}", "grad_accum=1")
    assert two["world_size"] == 2 and two["total_tokens"] == one["total_tokens"]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two["final_val_ppl"] == pytest.approx(one["final_val_ppl"], rel=1e-4)
    assert two["replica_divergence"] == 0.0  # every rank holds identical weights (W0 after 3 merges included)
    assert stdout.count("final validation perplexity") == 1  # only rank 0 reports


@pytest.mark.parametrize("method", ["poet-paper", "poet"])
def test_fsdp2_matches_one_process_and_its_checkpoint_loads_unsharded(tmp_path, capsys, method):
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    one_losses, one, _ = run(tmp_path, "one", 1, "grad_accum=2", f"method={method!r}")
    fsdp_losses, fsdp, _ = run(tmp_path, "fsdp", 2, "grad_accum=1", "parallel='fsdp'", f"method={method!r}")
    assert fsdp_losses == pytest.approx(one_losses, rel=1e-4)
    assert fsdp["final_val_ppl"] == pytest.approx(one["final_val_ppl"], rel=1e-4)
    if method == "poet":  # the optimizer rotated whole weights and kept the shards' spectra
        assert fsdp["spectrum_drift"] < 1e-5
    # Checkpoints hold full (gathered) tensors: a single process evaluates the sharded run's model.
    assert main(["eval", str(tmp_path / "runs" / "fsdp")]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity:")[1].split()[0])
    assert ppl == pytest.approx(fsdp["final_val_ppl"], rel=1e-3)
    # final/ is gathered from the shards: the run's dense model, loadable without poetlm.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 16))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "fsdp" / "final")
    assert type(final).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(final(ids).logits, load_run_model(tmp_path / "runs" / "fsdp")[0](ids).logits, rtol=1e-5, atol=1e-5)


def test_fsdp2_fold_form_resumes_exactly_from_its_gathered_checkpoint(tmp_path):
    """Two ranks of the default POET under FSDP2: drop the last checkpoint, resume from the middle one, and
    the run ends bit for bit where it ended before (the POET optimizer's whole-tensor state round-trips)."""
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    losses, summary, _ = run(tmp_path, "fsdp", 2, "grad_accum=1", "parallel='fsdp'", "keep_checkpoints=2")
    run_dir = tmp_path / "runs" / "fsdp"
    first = {name: tensor.clone() for name, tensor in load_run_model(run_dir)[0].state_dict().items()}
    (run_dir / "checkpoints" / "step_00000006.pt").unlink()
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "poetlm", "train", "--resume", str(run_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["final_val_ppl"] == summary["final_val_ppl"] and resumed["steps"] == 6
    for name, tensor in load_run_model(run_dir)[0].state_dict().items():
        assert torch.equal(tensor, first[name]), name


def test_a_run_resumed_on_fewer_processes_keeps_its_global_batch(tmp_path):
    """Two processes, then one from the middle checkpoint: grad_accum doubles, the steps take the same rows."""
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    losses, summary, _ = run(tmp_path, "two", 2, "grad_accum=1", "keep_checkpoints=2")
    run_dir = tmp_path / "runs" / "two"
    (run_dir / "checkpoints" / "step_00000006.pt").unlink()
    result = subprocess.run([sys.executable, "-m", "poetlm", "train", "--resume", str(run_dir)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "grad_accum 1 → 2 keeps the run's 8 sequences per step" in result.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["total_tokens"] == summary["total_tokens"]
    assert resumed["final_val_ppl"] == pytest.approx(summary["final_val_ppl"], rel=1e-4)


def test_dropout_draws_per_micro_batch_so_any_number_of_processes_trains_alike(tmp_path):
    """GPT-2 drops out 10%: every rank seeded alike drew the same masks as the others (correlated dropout), and two
    processes did not match one. Each micro-batch of the global batch now draws its own, wherever it runs."""
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    gpt2 = ("model.hf_config='gpt2'", "keep_checkpoints=2")
    one_losses, one, _ = run(tmp_path, "one", 1, *gpt2, "grad_accum=2")
    two_losses, two, _ = run(tmp_path, "two", 2, *gpt2, "grad_accum=1")
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two["final_val_ppl"] == pytest.approx(one["final_val_ppl"], rel=1e-4)
    run_dir = tmp_path / "runs" / "two"  # resumed from its middle checkpoint on one process: the same masks again
    (run_dir / "checkpoints" / "step_00000006.pt").unlink()
    result = subprocess.run([sys.executable, "-m", "poetlm", "train", "--resume", str(run_dir)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["final_val_ppl"] == pytest.approx(one["final_val_ppl"], rel=1e-4)


def test_a_run_resumed_under_fsdp2_from_one_process_keeps_its_global_batch(tmp_path):
    """One process, then two FSDP2 ranks from the middle checkpoint: its optimizer states, numbered as
    optimizer.state_dict() numbers them, load into the sharded run (they failed: KeyError 'state.0.step')."""
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    losses, summary, _ = run(tmp_path, "one", 1, "grad_accum=2", "keep_checkpoints=2")
    run_dir = tmp_path / "runs" / "one"
    (run_dir / "checkpoints" / "step_00000006.pt").unlink()
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "poetlm", "train", "--resume",
                             str(run_dir), "parallel='fsdp'"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "grad_accum 2 → 1 keeps the run's 8 sequences per step" in result.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["total_tokens"] == summary["total_tokens"] and resumed["world_size"] == 2
    assert resumed["final_val_ppl"] == pytest.approx(summary["final_val_ppl"], rel=1e-4)
    assert resumed["spectrum_drift"] < 1e-5  # the POET optimizer went on with its loaded state on whole weights


def test_fsdp2_finetune_writes_an_adapter_that_rebuilds_the_run_on_its_base(tmp_path):
    """The merge history is gathered from the shards on every rank, the adapter written from the whole model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from poetlm.adapter import load_adapter
    from poetlm.train.data import train_tokenizer

    docs = read_documents("shakespeare", max_documents=300)
    (tmp_path / "plays.txt").write_text("\n\n".join(docs))
    base = tmp_path / "base"
    tokenizer = train_tokenizer(docs, 300, base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(base)
    run(tmp_path, "ft", 2, "grad_accum=1", "parallel='fsdp'", "method='poet-paper'", f"finetune.base_model={str(base)!r}",
        "optim.lr_poet=1e-2")
    run_dir = tmp_path / "runs" / "ft"
    replayed = load_adapter(AutoModelForCausalLM.from_pretrained(base), run_dir / "adapter.safetensors")
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        expected = load_run_model(run_dir)[0](ids).logits
        assert (expected - AutoModelForCausalLM.from_pretrained(base)(ids).logits).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(replayed(ids).logits, expected, rtol=1e-5, atol=1e-5)


def _descendants(root: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _with_env(pids: list[int], entry: bytes) -> int | None:
    """The process among `pids` whose environment holds `entry` exactly (e.g. b"RANK=1")."""
    for pid in pids:
        try:
            if entry in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    return None


def test_a_signal_to_one_worker_stops_every_rank_at_one_checkpoint(tmp_path):
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    cmd = command(tmp_path, "sig", 2, "steps=100000", "checkpoint_every=100000", "eval_every=100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = tmp_path / "runs" / "sig"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                              and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
            time.sleep(0.2)
        workers = _descendants(proc.pid)
        worker = _with_env(workers, b"RANK=1")
        assert worker is not None, "no worker with RANK=1 found"
        os.kill(worker, signal.SIGTERM)  # that worker alone: rank 0 never sees a signal
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *workers]:  # torchrun starts each worker in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        pytest.fail("the job hung after one worker got SIGTERM")
    assert "SIGTERM received: checkpoint at step" in err
    saved = ckpt.load_checkpoint(run_dir)
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert saved["step"] == max(logged)  # both ranks stopped after the same step, and that step was saved


def test_a_set_up_error_on_one_rank_stops_the_others_with_one_line(tmp_path):
    """Rank 0 alone reads the data; a rank waiting for it says that another process stopped, not a gloo traceback."""
    (tmp_path / "plays.txt").write_bytes(b"caf\xe9 au lait\n\nmore text here\n")
    result = subprocess.run(command(tmp_path, "broken", 2), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "poetlm: error (rank 0 of 2): " in result.stderr and "not valid UTF-8" in result.stderr
    assert ("poetlm: rank 1 of 2 stops: another process of this job stopped (its error is above, or, if it was killed, "
            "in torchrun's summary below)") in result.stderr
    assert "Connection closed by peer" not in result.stderr and "loop.py" not in result.stderr
