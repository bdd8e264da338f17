"""`poetlm finetune` on small pretrained models saved to disk (no hub)."""

import json
import os
import shutil
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import poetlm
from poetlm.adapter import load_adapter
from poetlm.cli import main
from poetlm.train.data import prepare_data, read_documents, train_tokenizer
from poetlm.train.evaluate import perplexity
from poetlm.train.runs import load_run_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random LLaMA with its own tokenizer, saved like a downloaded model."""
    root = tmp_path_factory.mktemp("ft")
    corpus = root / "plays.txt"
    docs = read_documents("shakespeare", max_documents=300)
    corpus.write_text("\n\n".join(docs))
    model_dir = root / "base"
    tokenizer = train_tokenizer(docs, 300, model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, corpus


def finetune_args(base, tmp_path, *extra):
    model_dir, corpus = base
    return ["finetune", "--model", str(model_dir), "--data", str(corpus), "--out", str(tmp_path / "runs"), "--no-progress",
            "steps=6", "batch_size=4", "data.seq_len=32", "eval_tokens=512", "eval_every=3", "log_every=1",
            "checkpoint_every=3", "poet.block_size=8", "poet.merge_every=2", f"data.cache_dir={str(tmp_path / 'cache')!r}",
            "optim.lr_poet=1e-2", *extra]


def reload(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_wrapped_pretrained_llama_starts_at_the_original_logits(base):
    original = reload(base[0])
    ids = torch.randint(0, 300, (2, 12))
    wrapped = poetlm.poetize(reload(base[0]), poetlm.POETConfig(block_size=8, init="keep"))
    assert len(list(poetlm.poet_layers(wrapped))) == 14
    torch.testing.assert_close(wrapped(ids).logits, original(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["poet", "poet-paper"])
def test_gpt2_conv1d_finetunes_and_exports_to_gpt2(base, tmp_path, method):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, gpt2 / name)
    assert main(finetune_args((gpt2, base[1]), tmp_path, "--method", method, "--name", "ft")) == 0
    run_dir = tmp_path / "runs" / "ft"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_ppl"] < summary["initial_val_ppl"]
    assert summary["block_linear_trainable_params"] > 0  # GPT-2's blocks (transformer.h.N) are counted too
    finetuned, _, _ = load_run_model(run_dir)
    ids = torch.randint(0, 300, (2, 12))
    target = finetuned(ids).logits
    assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, target, rtol=1e-4, atol=1e-4)
    final = GPT2LMHeadModel.from_pretrained(run_dir / "final").eval()  # what every run writes at its end
    torch.testing.assert_close(final(ids).logits, target, rtol=1e-4, atol=1e-4)
    if method == "poet-paper":
        adapted = load_adapter(reload(gpt2).eval(), run_dir / "adapter.safetensors")
        torch.testing.assert_close(adapted(ids).logits, target, rtol=1e-5, atol=1e-5)


def test_poet_paper_finetune_run_adapter_and_export(base, tmp_path, capsys):
    assert main(finetune_args(base, tmp_path, "--method", "poet-paper", "--name", "ft", "finetune.train_norms=true")) == 0
    run_dir = tmp_path / "runs" / "ft"
    summary = json.loads((run_dir / "summary.json").read_text())
    # Perplexity before finetuning is the untouched base model's, computed independently here.
    data = prepare_data(str(base[1]), tokenizer=str(base[0]), vocab_size=300, cache_root=tmp_path / "cache")
    expected = perplexity(reload(base[0]), data.val, seq_len=32, batch_size=4, max_tokens=512, device="cpu")["val_ppl"]
    assert summary["initial_val_ppl"] == pytest.approx(expected, rel=1e-5)
    assert summary["final_val_ppl"] < summary["initial_val_ppl"]
    assert f"| {summary['initial_val_ppl']:.2f} | {summary['final_val_ppl']:.2f} |" in (run_dir / "report.md").read_text()
    finetuned, _, _ = load_run_model(run_dir)
    trainable = {n for n, p in finetuned.named_parameters() if p.requires_grad}
    assert all("rotation_" in n or "norm" in n for n in trainable)
    assert any("norm" in n for n in trainable)
    # Only rotations and norms moved: embeddings and head are the base's.
    base_model = reload(base[0])
    assert torch.equal(finetuned.lm_head.weight, base_model.lm_head.weight)

    ids = torch.randint(0, 300, (2, 12))
    target = finetuned(ids).logits
    adapted = load_adapter(reload(base[0]), run_dir / "adapter.safetensors")
    torch.testing.assert_close(adapted(ids).logits, target, rtol=1e-5, atol=1e-5)
    assert (adapted(ids).logits - base_model(ids).logits).abs().max() > 1e-3
    assert (run_dir / "adapter.safetensors").stat().st_size < (base[0] / "model.safetensors").stat().st_size

    assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(reload(tmp_path / "merged")(ids).logits, target, rtol=1e-4, atol=1e-4)
    # The run directory is an adapter directory too: it reopens as a POETModel, trainable as it was.
    reopened = poetlm.POETModel.from_pretrained(reload(base[0]), run_dir)
    torch.testing.assert_close(reopened(input_ids=ids).logits, target, rtol=1e-5, atol=1e-5)
    assert {n for n, p in reopened.named_parameters() if p.requires_grad} == {"base_model." + n for n in trainable}


def test_poet_finetune_rotates_the_pretrained_weights_and_keeps_their_spectrum(base, tmp_path):
    assert main(finetune_args(base, tmp_path, "--name", "fold", "optim.lr_poet=0.05")) == 0
    run_dir = tmp_path / "runs" / "fold"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_ppl"] < summary["initial_val_ppl"] and summary["spectrum_drift"] < 1e-5
    finetuned, base_model = load_run_model(run_dir)[0], reload(base[0])
    for (name, tuned), (_, original) in zip(finetuned.named_parameters(), base_model.named_parameters()):
        if name.endswith("_proj.weight"):  # rotated: moved, same singular values
            assert not torch.equal(tuned, original)
            torch.testing.assert_close(torch.linalg.svdvals(tuned), torch.linalg.svdvals(original), atol=1e-5, rtol=1e-5)
        else:  # frozen: embeddings, norms, head
            assert torch.equal(tuned, original), name


@pytest.mark.parametrize("method", ["lora", "adamw"])
def test_lora_and_full_finetuning_in_the_same_harness(base, tmp_path, method):
    assert main(finetune_args(base, tmp_path, "--method", method, "--name", method, "optim.lr=1e-2")) == 0
    run_dir = tmp_path / "runs" / method
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_ppl"] < summary["initial_val_ppl"]
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():  # final/: LoRA merged into the base's layers by peft, a plain model
        torch.testing.assert_close(reload(run_dir / "final")(ids).logits, load_run_model(run_dir)[0](ids).logits, rtol=1e-4, atol=1e-4)
    if method == "lora":  # r=8 on 7 linears × 2 layers: A (8×in) + B (out×8)
        expected = 2 * 8 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
        assert summary["block_linear_trainable_params"] == expected
        assert main(["export", str(run_dir), str(tmp_path / "lora-merged")]) == 0
        model, _, _ = load_run_model(run_dir)
        ids = torch.randint(0, 300, (2, 12))
        torch.testing.assert_close(reload(tmp_path / "lora-merged")(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    else:
        assert summary["trainable_params"] == sum(p.numel() for p in reload(base[0]).parameters())


def test_unreachable_hub_model_is_a_clear_error(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = finetune_args(base, tmp_path, "data.tokenizer=" + repr(str(base[0])))
    args[args.index("--model") + 1] = "some-org/not-a-local-model"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "some-org/not-a-local-model" in err and "local directory" in err and "Traceback" not in err


def test_lora_without_a_base_model_is_a_config_error(capsys):
    assert main(["train", "method='lora'"]) == 2
    assert "finetune.base_model" in capsys.readouterr().err


def small_gpt2(base, path, n_positions):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=n_positions)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, path / name)
    return path


def test_eval_scores_within_the_models_context(base, tmp_path, capsys, monkeypatch):
    from poetlm.train import evaluate
    from poetlm.train.config import DataConfig

    monkeypatch.setattr(DataConfig, "cache_dir", str(tmp_path / "cache"))
    scored = []
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, seq_len, **k: scored.append(seq_len) or perplexity(*a, seq_len=seq_len, **k))
    gpt2 = small_gpt2(base, tmp_path / "gpt2", n_positions=40)  # learned positions: past 40 an IndexError
    eval_args = ["--data", str(base[1]), "--tokens", "256"]
    assert main(["eval", str(gpt2), *eval_args]) == 0 and scored == [40]  # not the default 256
    assert main(["eval", str(base[0]), *eval_args, "--seq-len", "48"]) == 0 and scored[-1] == 48
    capsys.readouterr()
    for model_dir, seq_len, context in [(gpt2, 41, 40), (base[0], 1024, 64)]:  # LLaMA's rotary positions never fail: refused too
        assert main(["eval", str(model_dir), *eval_args, "--seq-len", str(seq_len)]) == 1
        assert (f"poetlm: error: --seq-len {seq_len} is longer than the context of {model_dir} ({context} tokens, its "
                f"max_position_embeddings); use --seq-len {context} or less\n") in capsys.readouterr().err
    assert len(scored) == 2


def test_finetune_longer_than_the_models_context_is_refused(base, tmp_path, capsys):
    gpt2 = small_gpt2(base, tmp_path / "gpt2", n_positions=40)
    for model_dir, context in [(gpt2, 40), (base[0], 64)]:
        assert main(finetune_args((model_dir, base[1]), tmp_path, "data.seq_len=65")) == 1
        err = capsys.readouterr().err
        assert (f"poetlm: error: data.seq_len=65 is longer than the context of {model_dir} ({context} tokens, its "
                f"max_position_embeddings); use data.seq_len={context} or less\n") in err and "Traceback" not in err


def test_finetune_refuses_a_tokenizer_that_is_not_the_base_models(base, tmp_path, capsys):
    from poetlm.train.config import resolve_config
    from poetlm.train.models import ModelError, data_tokenizer

    other = tmp_path / "other-tokenizer"  # same size, trained on another corpus: other ids for other tokens
    train_tokenizer(read_documents("sotu", max_documents=100), 300, other)
    copy = tmp_path / "copy-tokenizer"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, copy / name)

    def chosen(tokenizer, *overrides):
        return data_tokenizer(resolve_config("finetune", [("finetune.base_model", str(base[0])), ("data.tokenizer", str(tokenizer)),
                                                          *overrides]))

    assert chosen(copy) == str(copy)  # the model's own vocabulary from another directory is fine
    with pytest.raises(ModelError, match=rf"^data.tokenizer='{other}' is not the tokenizer of {base[0]} \(vocabularies of 300 "
                                         r"and 300 tokens, \d+ of them with the same id\): the model would read its token ids "
                                         r"as other tokens. Leave data.tokenizer unset .* finetune.allow_other_tokenizer=true"):
        chosen(other)
    capsys.readouterr()
    assert chosen(other, ("finetune.allow_other_tokenizer", True)) == str(other)
    assert "poetlm: warning: data.tokenizer=" in capsys.readouterr().err
    assert main(finetune_args(base, tmp_path, f"data.tokenizer={str(other)!r}")) == 1  # before any data is tokenized
    assert "is not the tokenizer of" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_what_finetune_takes_as_its_model_and_settings_that_would_do_nothing(base, tmp_path, capsys):
    assert main(finetune_args(base, tmp_path, "--name", "first", "steps=3")) == 0
    run_dir = tmp_path / "runs" / "first"
    capsys.readouterr()
    args = finetune_args(base, tmp_path, "--name", "second", "steps=3")
    args[args.index("--model") + 1] = str(run_dir)  # a run directory: its final/ is the model
    assert main(args) == 0
    assert f"finetuning {run_dir / 'final'}" in capsys.readouterr().err
    first = json.loads((run_dir / "summary.json").read_text())
    second = json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())
    assert second["initial_val_ppl"] == pytest.approx(first["final_val_ppl"], rel=1e-5)

    args[args.index("--model") + 1] = str(tmp_path / "no-such-dir")
    assert main(args) == 1
    assert "finetune.base_model=" in (err := capsys.readouterr().err) and "does not exist" in err and "--tokenizer" not in err
    weights_only = tmp_path / "weights-only"
    reload(base[0]).save_pretrained(weights_only)
    args[args.index("--model") + 1] = str(weights_only)
    assert main(args) == 1
    assert "has no tokenizer files" in capsys.readouterr().err
    assert main(finetune_args(base, tmp_path, "--name", "biases", "finetune.train_biases=true")) == 1
    assert "the model has no biases" in capsys.readouterr().err
    assert main(finetune_args(base, tmp_path, "--name", "typo", "poet.exclude_modules=['mpl']")) == 1
    assert "exclude_modules entry 'mpl' matches no module" in capsys.readouterr().err


def test_eval_reproduces_a_finetunes_initial_perplexity_with_its_split_seed(base, tmp_path, capsys):
    assert main(finetune_args(base, tmp_path, "--name", "seeded", "--seed", "1", "steps=3")) == 0
    initial = json.loads((tmp_path / "runs" / "seeded" / "summary.json").read_text())["initial_val_ppl"]
    capsys.readouterr()
    assert main(["eval", str(base[0]), "--data", str(base[1]), "--tokens", "512", "--seq-len", "32", "--split-seed", "1",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert float(capsys.readouterr().out.split("perplexity:")[1].split()[0]) == pytest.approx(initial, rel=1e-3)


def test_a_bf16_base_trains_in_fp32_master_weights_for_every_method(base, tmp_path):
    """Most checkpoints are stored in bf16: POET must still fold into fp32 weights (it refused to run), and
    AdamW's updates must not round away in bf16 weights (a third of the entries moved, and final/ was bf16)."""
    bf16 = tmp_path / "bf16-base"
    reload(base[0]).to(torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, bf16 / name)
    stored = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).state_dict()
    for method in ("poet", "adamw"):
        assert main(finetune_args((bf16, base[1]), tmp_path, "--name", method, f"--method={method}", "optim.lr=1e-3")) == 0
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / method / "final", dtype="auto")
        assert final.dtype == torch.float32
        if method == "adamw":  # every weight took its updates; in bf16 most of them rounded back to the stored value
            weight = final.state_dict()["model.layers.0.mlp.up_proj.weight"]
            moved = (weight != stored["model.layers.0.mlp.up_proj.weight"].float()).float().mean()
            assert moved > 0.95


def test_settings_that_would_train_nothing_or_only_count_more_parameters_are_refused(base, tmp_path, capsys):
    assert main(finetune_args(base, tmp_path, "--name", "rank", "--method=lora", "finetune.lora_rank=33")) == 1
    err = capsys.readouterr().err
    assert "finetune.lora_rank=33 exceeds min(in, out) = 32 of" in err and "Traceback" not in err
    no_blocks = tmp_path / "no-blocks"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=0, n_head=2)).save_pretrained(no_blocks)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, no_blocks / name)
    assert main(finetune_args((no_blocks, base[1]), tmp_path, "--name", "muon", "--method=muon")) == 1
    err = capsys.readouterr().err
    assert "Muon trains the decoder blocks' 2-D weights, and this model has none" in err and "Traceback" not in err


def test_a_base_smaller_than_its_own_tokenizer_is_named_as_damaged(base, tmp_path, capsys):
    small = tmp_path / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base[0] / name, small / name)
    assert main(finetune_args((small, base[1]), tmp_path)) == 1
    err = capsys.readouterr().err
    assert "embeds only 200: its own tokenizer and weights disagree" in err and "leave data.tokenizer unset" not in err


def test_a_poet_paper_finetune_resumed_on_a_changed_base_is_refused(base, tmp_path, capsys, monkeypatch):
    from poetlm.train import loop

    moved = tmp_path / "base"
    shutil.copytree(base[0], moved)
    original = loop.micro_batch_loss
    calls = {"n": 0}

    def stop_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "micro_batch_loss", stop_at_step_4)
    assert main(finetune_args((moved, base[1]), tmp_path, "--method", "poet-paper", "--name", "ft")) == 128 + signal.SIGTERM
    monkeypatch.undo()
    other = reload(moved)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    other.save_pretrained(moved)
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "ft"
    assert main(["train", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"finetune.base_model='{moved}' changed since the run started" in err
    assert "'model.layers.0.mlp.down_proj' differ" in err and not (run_dir / "adapter.safetensors").exists()


@pytest.mark.parametrize("method", ["poet-paper", "lora"])
def test_a_finished_finetune_is_read_without_its_base(base, tmp_path, capsys, method):
    moved = tmp_path / "base"
    shutil.copytree(base[0], moved)
    assert main(finetune_args((moved, base[1]), tmp_path, "--method", method, "--name", "ft")) == 0
    run_dir = tmp_path / "runs" / "ft"
    ids = torch.randint(0, 300, (2, 12))
    expected = load_run_model(run_dir)[0](ids).logits
    shutil.rmtree(moved)
    capsys.readouterr()
    model, _, _ = load_run_model(run_dir)
    assert "building the run's architecture from" in capsys.readouterr().err
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(reload(tmp_path / "merged")(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage", ["more_layers", "other_architecture", "truncated", "pickled_code"])
def test_a_base_that_would_load_in_part_at_random_is_refused_before_training(base, tmp_path, capsys, damage):
    """finetune loads its base as eval and generate do: no weight silently drawn at random, no traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(base[0], broken)
    config = json.loads((broken / "config.json").read_text())
    if damage == "more_layers":
        config["num_hidden_layers"] = 3
    elif damage == "other_architecture":
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    elif damage == "truncated":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (broken / "model.safetensors").unlink()
        torch.save({"evil": signal.SIGTERM}, broken / "pytorch_model.bin")  # an object that is not a tensor
    (broken / "config.json").write_text(json.dumps(config))
    assert main(finetune_args((broken, base[1]), tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err
    assert "poetlm: error: finetune.base_model:" in err and str(broken) in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("final"))


def test_lora_targets_as_one_name_wraps_that_layer(base, tmp_path, capsys):
    """A plain name as a string is that name (peft alone would read it as a regex of whole module names)."""
    common = ["--method", "lora", "steps=2", "eval_every=2", "checkpoint_every=2"]
    assert main(finetune_args(base, tmp_path, *common, "--name", "q", "finetune.lora_targets='q_proj'")) == 0
    summary = json.loads((tmp_path / "runs" / "q" / "summary.json").read_text())
    assert summary["block_linear_trainable_params"] == 2 * 8 * (32 + 32)  # r=8 on q_proj of 2 layers
    assert main(finetune_args(base, tmp_path, *common, "--name", "x", "finetune.lora_targets='no_such_layer'")) == 1
    assert 'a list such as ["q_proj", "v_proj"], or a regex that matches whole module names' in capsys.readouterr().err
