"""poetlm.integrations with the real libraries: transformers.Trainer, accelerate, a plain PyTorch loop."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerState, TrainingArguments

import poetlm
from poetlm.integrations import MergeSchedule, POETCallback, trainer_optimizer
from poetlm.model import rotated_weights
from poetlm.optim import POET


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=16):
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# transformers 5 renamed gradient checkpointing; 4.x knows only the old name.
CHECKPOINTING = next(n for n in ("activation_checkpointing", "gradient_checkpointing") if n in TrainingArguments.__dataclass_fields__)


def args(out, **kw):
    values = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  **{CHECKPOINTING: True}, learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="constant",
                  max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                  disable_tqdm=True)
    return TrainingArguments(**{**values, **kw})


def trainer(model, training_args):
    optimizer = trainer_optimizer(model, training_args, lr_poet=1e-2)
    return Trainer(model=model, args=training_args, train_dataset=Tokens(), optimizers=(optimizer, None),
                   callbacks=[POETCallback()])


def test_trainer_with_accumulation_and_checkpointing_merges_on_schedule(tmp_path):
    model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=2))
    start = {name: layer.weight0.detach().clone() for name, layer in poetlm.poet_layers(model)}
    t = trainer(model, args(tmp_path))
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert t.optimizer.param_groups[-1]["name"] == "poet"
    assert groups["poet"]["lr"] == 1e-2 and groups["poet"]["weight_decay"] == 0.0 and groups["base"]["weight_decay"] == 0.1
    t.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(int(layer.merge_count) == 3 for _, layer in poetlm.poet_layers(model))  # steps 2, 4, 6
    assert all(not torch.equal(layer.weight0, start[name]) for name, layer in poetlm.poet_layers(model))
    rotations = poetlm.rotation_parameters(model)
    assert not any(p in t.optimizer.state for p in rotations)  # reset by the merge after step 6
    assert any(p in t.optimizer.state for p in model.model.embed_tokens.parameters())  # other state kept
    logged = [entry for entry in t.state.log_history if "loss" in entry]
    assert len(logged) == 6 and all(entry["learning_rate"] == 1e-3 for entry in logged)  # the base lr


def test_the_callback_clips_at_a_tenth_right_after_a_merge_and_ramps_back():
    model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=20))
    training_args = args("unused", max_grad_norm=2.0)
    params = [p for p in model.parameters() if p.requires_grad]
    for global_step, expected in [(3, 2.0), (20, 0.2), (25, 2.0 * (0.1 + 0.9 * 5 / 10)), (30, 2.0), (40, 0.2)]:
        for p in params:
            p.grad = torch.ones_like(p)
        torch.nn.utils.clip_grad_norm_(params, training_args.max_grad_norm)  # what Trainer does first
        POETCallback(ramp_steps=10).on_pre_optimizer_step(training_args, TrainerState(global_step=global_step), None, model=model)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        assert float(norm) == pytest.approx(expected, rel=1e-5), global_step
    POETCallback().on_pre_optimizer_step(args("unused", max_grad_norm=0.0), TrainerState(global_step=20), None, model=model)


@pytest.mark.slow
def test_trainer_resumes_exactly_across_a_merge(tmp_path):
    """Checkpoint at step 3 (after the merge at 2, inside its clip ramp, before the merge at 4)."""
    full = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=2))
    run = trainer(full, args(tmp_path / "a", save_strategy="steps", save_steps=3))
    run.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    # The checkpoint directory is also a plain transformers directory: the dense model, not random weights.
    dense = LlamaForCausalLM.from_pretrained(checkpoint)
    assert not any(isinstance(m, poetlm.POETLinear) for m in dense.modules())

    resumed = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=2))
    again = trainer(resumed, args(tmp_path / "b", save_strategy="steps", save_steps=3))
    again.train(resume_from_checkpoint=str(checkpoint))
    ours, theirs = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    losses = [e["loss"] for e in run.state.log_history if "loss" in e]
    assert [e["loss"] for e in again.state.log_history if "loss" in e] == losses  # steps 1-3 restored, 4-6 recomputed
    assert all(int(layer.merge_count) == 3 for _, layer in poetlm.poet_layers(resumed))


def test_merge_schedule_in_a_plain_loop_resumes_exactly():
    def run(steps, state=None):
        model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=3))
        optimizer = torch.optim.AdamW(poetlm.param_groups(model, lr_base=1e-2, lr_poet=1e-2, weight_decay=0.0))
        schedule = MergeSchedule(model, optimizer, max_grad_norm=0.5, ramp_steps=4)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
        clips = []
        while schedule.step_count < steps:
            ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(schedule.step_count))
            model(input_ids=ids, labels=ids).loss.backward()
            clips.append(schedule.clip_value())
            torch.nn.utils.clip_grad_norm_(model.parameters(), clips[-1])
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
        return model, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, clips

    full, _, clips = run(8)
    assert clips == [0.5, 0.5, 0.5, 0.05, 0.5 * (0.1 + 0.9 / 4), 0.5 * (0.1 + 0.9 / 2), 0.05, 0.5 * (0.1 + 0.9 / 4)]
    _, halfway, _ = run(4)
    resumed, _, _ = run(8, halfway)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ValueError, match="same merge_every"):
        MergeSchedule(full, merge_every=5).load_state_dict(halfway["schedule"])
    with pytest.raises(ValueError, match="poetlm.optim.POET needs no merge schedule"):
        MergeSchedule(llama())


def test_merge_schedule_counts_the_steps_accelerate_takes_not_its_micro_batches():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=3))
    optimizer = torch.optim.AdamW(poetlm.param_groups(model, lr_base=1e-2, lr_poet=1e-2, weight_decay=0.0))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = MergeSchedule(model, optimizer)
    merged_at = []
    for micro in range(1, 13):  # 6 optimizer steps
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(micro))
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad()
            if schedule.step():
                merged_at.append(micro)
                assert all(p.grad is None or not p.grad.any() for p in poetlm.rotation_parameters(model))
    assert schedule.step_count == 6 and merged_at == [6, 12]  # after optimizer steps 3 and 6, never mid-accumulation


@pytest.mark.slow
def test_accelerate_two_cpu_processes_keep_identical_replicas_across_merges(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    worker = Path(__file__).parent / "accelerate_worker.py"
    out = tmp_path / "result.json"
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["merges"] == [3]
    assert summary["divergence"] == 0.0  # W0 after three merges, rotations, coordinates: the same on both ranks
    assert summary["clips"] == pytest.approx([1.0, 1.0, 0.1, 0.19, 0.1, 0.19])
    assert summary["rotation_state"] == 0


def test_trainer_with_the_fold_every_step_optimizer():
    """POET's default form needs no callback: poetlm.POET rotates the weights themselves every step."""
    model = llama()
    config = poetlm.POETConfig(init="keep", block_size=8)
    weights = [w for _, w in rotated_weights(model, config)]
    for param in model.parameters():
        param.requires_grad_(any(param is w for w in weights))
    spectra = [torch.linalg.svdvals(w.detach()) for w in weights]
    before = [w.detach().clone() for w in weights]
    optimizer = POET(weights, lr=0.02, poet=config)
    t = Trainer(model=model, args=args("unused", save_strategy="no"), train_dataset=Tokens(), optimizers=(optimizer, None))
    t.train()
    logged = [entry["loss"] for entry in t.state.log_history if "loss" in entry]
    assert logged[-1] < logged[0]
    for weight, start, spectrum in zip(weights, before, spectra):
        assert (weight.detach() - start).norm() > 1e-3  # rotated ...
        torch.testing.assert_close(torch.linalg.svdvals(weight.detach()), spectrum, rtol=0, atol=1e-5)  # ... not rescaled


@pytest.mark.slow
def test_trainer_with_poet_optimizer_for_a_whole_model_resumes_exactly(tmp_path):
    """The default form for a whole model (POET on the block linears, AdamW on the rest) as Trainer's optimizer."""
    from poetlm.optim import poet_optimizer

    def run(out, resume=None):
        model = llama()
        optimizer = poet_optimizer(model, lr_poet=0.04, lr=3e-3, poet=poetlm.POETConfig(block_size=8))
        t = Trainer(model=model, args=args(out, save_strategy="steps", save_steps=3), train_dataset=Tokens(),
                    optimizers=(optimizer, None))
        t.train(resume_from_checkpoint=resume)
        return model, [e["loss"] for e in t.state.log_history if "loss" in e]

    full, losses = run(tmp_path / "a")
    assert losses[-1] < losses[0]
    resumed, again = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert again == losses
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_one_cycle_lr_drives_the_chained_fold_optimizer_without_momentum_cycling():
    model = llama()
    optimizer = poetlm.optim.poet_optimizer(model, poet=poetlm.POETConfig(block_size=16))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[0.02] + [3e-3] * (len(optimizer.param_groups) - 1),
                                                    total_steps=6, cycle_momentum=False)
    rates = []
    for step in range(5):
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        rates.append(optimizer.optimizers[0].param_groups[0]["lr"])
    assert max(rates) == pytest.approx(0.02, rel=0.3) and rates[-1] < 0.1 * max(rates)  # up to max_lr, then annealed


def test_merge_schedule_reads_a_zero_clip_as_none_and_refuses_bad_ones():
    model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8, merge_every=1))
    for off in (0, 0.0, None):
        schedule = MergeSchedule(model, max_grad_norm=off)
        schedule.step()  # a merge: the post-merge ramp must not turn "no clipping" into a tight clip
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.full_like(p, 3.0)
        torch.nn.utils.clip_grad_norm_(params, schedule.clip_value())
        assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in params), off  # gradients untouched
    for bad in (-1.0, "1.0", float("nan"), True):
        with pytest.raises(ValueError, match="max_grad_norm=.* is invalid"):
            MergeSchedule(model, max_grad_norm=bad)


def test_trainer_optimizer_refuses_invalid_learning_rates_and_decay():
    model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8))
    for lr_poet in (-1e-2, 0.0, "1e-2", float("inf"), None):
        with pytest.raises(ValueError, match=r"^param_groups: lr_poet=.* is invalid: must be a finite number > 0"):
            trainer_optimizer(model, args("unused"), lr_poet=lr_poet)
    with pytest.raises(ValueError, match=r"^param_groups: weight_decay=-0.1 is invalid"):
        poetlm.param_groups(model, lr_base=1e-3, lr_poet=1e-2, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"^param_groups: lr_base='3e-3' is invalid"):
        poetlm.param_groups(model, lr_base="3e-3", lr_poet=1e-2, weight_decay=0.0)


def test_the_callback_and_the_schedule_check_their_settings_alike():
    model = poetlm.poetize(llama(), poetlm.POETConfig(block_size=8))
    for kwargs, message in [(dict(merge_every=0), "merge_every=0 is invalid"), (dict(merge_every="2"), "merge_every='2'"),
                            (dict(merge_every=True), "merge_every=True"), (dict(ramp_steps=-1), "ramp_steps=-1 is invalid"),
                            (dict(ramp_steps=2.5), "ramp_steps=2.5 is invalid")]:
        with pytest.raises(ValueError, match=message):
            POETCallback(**kwargs)
        with pytest.raises(ValueError, match=message):
            MergeSchedule(model, **kwargs)
    assert POETCallback(merge_every=None, ramp_steps=0).merge_every is None  # None: the POETConfig's
