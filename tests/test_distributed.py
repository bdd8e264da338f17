"""torchrun data parallelism on CPU (gloo): same global batch, same losses; identical replicas after merges."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poetlm.cli import main
from poetlm.train.data import read_documents

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
        "data.seq_len=32", "data.vocab_size=300", "batch_size=4", "eval_tokens=512", "log_every=1",
        "diagnostics_every=1", "poet.block_size=8", "poet.merge_every=2", "progress=false", "steps=6",
        "eval_every=3", "checkpoint_every=3"]


def run(tmp_path, name, nproc, *extra):
    common = [*TINY, f"data.data={str(tmp_path / 'plays.txt')!r}", f"data.cache_dir={str(tmp_path / 'cache')!r}",
              f"out_dir={str(tmp_path / 'runs')!r}", f"name={name!r}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "poetlm", "train", *common]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "poetlm", "train", *common]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    failure = [line for line in result.stderr.splitlines() if "Error" in line or "error" in line]
    assert result.returncode == 0, "\n".join(failure[:40]) or result.stderr[-3000:]
    run_dir = tmp_path / "runs" / name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], json.loads((run_dir / "summary.json").read_text()), result.stdout


@pytest.mark.parametrize("method", ["poet", "adamw"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, method):
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    one_losses, one, _ = run(tmp_path, "one", 1, f"method={method!r}", "grad_accum=2")
    two_losses, two, stdout = run(tmp_path, "two", 2, f"method={method!r}", "grad_accum=1")
    assert two["world_size"] == 2 and two["total_tokens"] == one["total_tokens"]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two["final_val_ppl"] == pytest.approx(one["final_val_ppl"], rel=1e-4)
    assert two["replica_divergence"] == 0.0  # every rank holds identical weights (W0 after 3 merges included)
    assert stdout.count("final validation perplexity") == 1  # only rank 0 reports


def test_fsdp2_matches_one_process_and_its_checkpoint_loads_unsharded(tmp_path, capsys):
    (tmp_path / "plays.txt").write_text("\n\n".join(read_documents("shakespeare", max_documents=300)))
    one_losses, one, _ = run(tmp_path, "one", 1, "grad_accum=2")
    fsdp_losses, fsdp, _ = run(tmp_path, "fsdp", 2, "grad_accum=1", "parallel='fsdp'")
    assert fsdp_losses == pytest.approx(one_losses, rel=1e-4)
    assert fsdp["final_val_ppl"] == pytest.approx(one["final_val_ppl"], rel=1e-4)
    # Checkpoints hold full (gathered) tensors: a single process evaluates the sharded run's model.
    assert main(["eval", str(tmp_path / "runs" / "fsdp")]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity:")[1].split()[0])
    assert ppl == pytest.approx(fsdp["final_val_ppl"], rel=1e-3)
