"""POETConfig, and the training config: resolution, validation, warnings and the files it writes."""

import re
import warnings

import pytest

from poetlm import POETConfig
from poetlm.cli import main
from poetlm.train.config import ConfigError, config_value, resolve_config
from poetlm.train.config_text import to_toml


@pytest.mark.parametrize("field,value,allowed", [
    ("variant", "xs", "bs"),
    ("block_size", 1, ">= 2"),
    ("block_size", 64.0, ">= 2"),
    ("block_size", True, ">= 2"),
    ("fraction", 0.0, "0 < fraction"),
    ("fraction", 1.5, "0 < fraction"),
    ("fraction", "half", "0 < fraction"),
    ("parameterization", "householder", "cayley_neumann"),
    ("neumann_terms", 0, ">= 1"),
    ("neumann_terms", 2.5, ">= 1"),
    ("merge_every", 0, ">= 1"),
    ("init", "zeros", "normalized_gaussian"),
    ("target_modules", [], "non-empty list"),
    ("target_modules", ["q_proj", 3], "non-empty list"),
    ("exclude_modules", "lm_head", "list of module names"),
    ("forward_mode", "fast", "auto"),
    ("seed", "0", "integer"),
])
def test_every_invalid_value_names_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        POETConfig(**{field: value})
    message = str(info.value)
    assert f"POETConfig.{field}={value!r}" in message and allowed in message


def test_defaults_and_dict_round_trip():
    config = POETConfig()
    assert (config.variant, config.block_size, config.parameterization, config.neumann_terms,
            config.merge_every, config.init) == ("bs", 256, "cayley_neumann", 4, 200, "normalized_gaussian")
    assert POETConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown field.*'blocksize'"):
        POETConfig.from_dict({"blocksize": 3})


def resolved_quietly(*overrides, preset="tiny"):
    """resolve_config that fails on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return resolve_config(preset, list(overrides))


def listed(argv, key, capsys):
    """The value column of `key` in the output of `poetlm config ARGV`."""
    assert main(["config", *argv]) == 0
    return next(line.split()[1] for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [key])


def test_poetlm_config_shows_the_values_plain_train_runs_and_another_preset_or_method(capsys):
    plain = resolved_quietly()
    for key, value in [("steps", "1000"), ("optim.lr", "0.01"), ("optim.lr_poet", "0.02"), ("optim.warmup_steps", "10"),
                       ("poet.block_size", "384"), ("eval_every", "250"), ("name", '"tiny-poet"')]:
        assert listed([], key, capsys) == value
    assert plain.steps == 1000 and plain.poet.block_size == 384
    assert listed(["--method", "poet-paper"], "poet.neumann_terms", capsys) == "3"
    assert listed(["--method", "poet-paper"], "optim.lr_poet", capsys) == "0.004"
    assert listed(["--config", "small"], "steps", capsys) == "600"


def test_the_presets_train_each_baseline_at_its_tuned_lr_and_an_explicit_value_wins(capsys):
    for preset in ("tiny", "small", "llama-60m", "llama-1b"):
        assert listed(["--config", preset, "--method", "adamw"], "optim.lr_hidden", capsys) == "0.001", preset
        assert listed(["--config", preset, "--method", "muon"], "optim.lr_muon", capsys) == "0.003", preset
    assert resolve_config("tiny", ["method='adamw'", "optim.lr_hidden=3e-4"]).optim.lr_hidden == 3e-4
    assert resolve_config("tiny", ["method='muon'"]).optim.lr == 1e-2  # the embeddings and head: every method's


def test_a_key_under_a_section_that_does_not_exist_is_matched_by_its_name():
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) 'train' \\(did you mean grad_accum\\?\\)"):
        resolve_config("tiny", ["train.grad_accum=2"])


def test_a_toml_file_builds_on_the_preset_its_base_names(tmp_path):
    (tmp_path / "plays.toml").write_text('base = "tiny"\nsteps = 40\n[data]\ndata = "shakespeare"\n[poet]\nblock_size = 64\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "short.toml").write_text('base = "../plays.toml"\nsteps = 20\n[methods.poet-paper.optim]\nlr_poet = 5e-3\n')
    tiny = resolve_config("tiny")
    for method in ("poet", "poet-paper", "adamw"):
        preset = resolve_config("tiny", [f"method={method!r}"])
        plays = resolve_config(str(tmp_path / "plays.toml"), [f"method={method!r}"])
        short = resolve_config(str(tmp_path / "sub" / "short.toml"), [f"method={method!r}"])
        assert (plays.steps, plays.data.data, plays.poet.block_size, short.steps) == (40, "shakespeare", 64, 20)
        assert plays.optim == preset.optim and plays.model == tiny.model  # the rest is tiny's, its method tables too
        assert short.optim.lr_poet == (5e-3 if method == "poet-paper" else preset.optim.lr_poet)
    assert resolve_config(str(tmp_path / "plays.toml")).name == "plays-poet"
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    with pytest.raises(ConfigError, match="leads back to itself"):
        resolve_config(str(tmp_path / "loop.toml"))
    (tmp_path / "typed.toml").write_text("base = 3\n")
    with pytest.raises(ConfigError, match="base=3 must be a preset name"):
        resolve_config(str(tmp_path / "typed.toml"))
    (tmp_path / "missing.toml").write_text('base = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="no preset or config file named .*nowhere.toml"):
        resolve_config(str(tmp_path / "missing.toml"))


def test_a_file_without_base_takes_each_methods_own_default_angle_or_lr_for_poet(tmp_path):
    (tmp_path / "bare.toml").write_text('[data]\ndata = "sotu"\n')
    assert resolve_config(str(tmp_path / "bare.toml")).optim.lr_poet == 0.02  # an angle, radians per step
    assert resolve_config(str(tmp_path / "bare.toml"), ["method='poet-paper'"]).optim.lr_poet == 1e-3  # AdamW's lr on Q
    assert resolve_config(str(tmp_path / "bare.toml"), ["method='poet-paper'", "optim.lr_poet=2e-3"]).optim.lr_poet == 2e-3


@pytest.mark.parametrize("method,keys,users", [
    ("poet", ["poet.merge_every=7", "poet.forward_mode='input'", "poet.build_dtype='bf16'", "optim.merge_clip_steps=3"],
     "method poet-paper only"),
    ("poet", ["optim.lr_hidden=1e-3"], "method adamw only"),
    ("poet-paper", ["rule.name='lie_adam'"], "method poet only"),
    ("adamw", ["poet.block_size=64", "optim.lr_poet=5"], "method poet / poet-paper only"),
    ("adamw", ["rule.name='lie_adam'"], "method poet only"),
    ("adamw", ["optim.lr_muon=1e-3"], "method muon only"),
])
def test_explicit_keys_the_method_does_not_read_are_named_in_one_warning(method, keys, users):
    with pytest.warns(UserWarning) as caught:
        resolve_config("tiny", [f"method={method!r}", *keys])
    assert len(caught) == 1
    message = str(caught[0].message)
    for key in keys:
        assert f"{key.partition('=')[0]} ({users})" in message
    assert message.startswith(f"{method} run ignores")
    resolved_quietly(f"method={method!r}")  # the preset's own settings for other methods (merge_every, …) are no warning


def test_finetuning_warns_about_model_sizes_and_pretraining_about_finetune_keys():
    with pytest.warns(UserWarning, match=r"model.hidden_size \(finetuning builds no model"):
        resolve_config("finetune", ["finetune.base_model='some/model'", "model.hidden_size=64"])
    with pytest.warns(UserWarning, match=r"finetune.lora_rank \(finetuning only"):
        resolve_config("tiny", ["finetune.lora_rank=4"])
    with pytest.warns(UserWarning, match=r"data.vocab_size \(the vocabulary is the given tokenizer's\)"):
        resolve_config("tiny", ["data.tokenizer='some/dir'", "data.vocab_size=8192"])
    with pytest.warns(UserWarning, match=r"data.vocab_size \(the vocabulary is the base model's\)"):
        resolve_config("finetune", ["finetune.base_model='some/model'", "data.vocab_size=8192"])
    for method in ("poet", "poet-paper"):  # a finetune's W0 is the base weight, whatever init draws
        with pytest.warns(UserWarning, match=r"poet.init \(a finetune's W0 is the base model's weight\), poet.init_scale"):
            resolve_config("finetune", ["finetune.base_model='some/model'", f"method={method!r}",
                                        "poet.init='normalized_gaussian'", "poet.init_scale=0.5"])


def test_poetlm_config_says_which_methods_read_a_key(capsys):
    assert main(["config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "[poet-paper] " in lines["poet.merge_every"] and "[poet-paper] " in lines["optim.merge_clip_steps"]
    assert "[muon] " in lines["optim.lr_muon"] and "[" not in lines["optim.lr"]


@pytest.mark.parametrize("override,message", [
    ("optim.beta1=1.5", "optim.beta1=1.5 is invalid: must be in [0, 1)"),
    ("optim.beta2=-3", "optim.beta2=-3.0 is invalid: must be in [0, 1)"),
    ("seed=-1", "seed=-1 is invalid: must be an integer in [0, 2**64)"),
    ("seed=18446744073709551616", "seed=18446744073709551616 is invalid"),
    ("data.split_seed=-1", "data.split_seed=-1 is invalid"),
    ("data.max_documents=0", "data.max_documents=0 is invalid: must be >= 1"),
    ("model.rope_theta=0", "model.rope_theta=0.0 is invalid: must be a finite number > 0"),
    ("model.rope_theta=-1", "model.rope_theta=-1.0 is invalid"),
    ("model.rope_theta=nan", "model.rope_theta=nan is invalid"),
    ("finetune.lora_alpha=nan", "finetune.lora_alpha=nan is invalid: must be a finite number > 0"),
    ("finetune.lora_alpha=-1", "finetune.lora_alpha=-1.0 is invalid"),
    ("data.tokenizer=''", "data.tokenizer='' is invalid: must name a tokenizer directory or hub id, or be null"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf is invalid: must be a finite number >= 0"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan is invalid: must be a finite number >= 0"),
    ("poet.init_scale=inf", "POETConfig.init_scale=inf is invalid: must be a finite number > 0"),
    ("rule.eps=inf", "RuleConfig.eps=inf is invalid: must be a finite number > 0"),
    ("name=123", """name=123 has the wrong type: expected str (a string goes in quotes: name='"123"')"""),
    ("warmup_steps=5", "'warmup_steps' (did you mean optim.warmup_steps?)"),
    ("optim.lrr=1", "'optim.lrr' (did you mean optim.lr"),
])
def test_bad_values_and_keys_are_config_errors_that_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny", [override])
    assert message in str(info.value)


@pytest.mark.parametrize("override,why,meant", [
    ('steps="12"', "an integer is written without quotes or a decimal point", 12),
    ("steps=12.", "an integer is written without quotes or a decimal point", 12),
    ('steps="1e3"', "an integer is written without quotes or a decimal point", 1000),
    ('optim.lr="1e-3"', "a number goes without quotes", 1e-3),
    ('optim.lr_muon="3"', "a number goes without quotes", 3.0),
    ("optim.lr=.5", "TOML needs a digit on both sides of a decimal point", 0.5),
])
def test_a_number_written_as_text_gets_a_hint_whose_value_the_key_takes(override, why, meant):
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny", [override])
    hint = re.search(r"\((.*): (\S+=\S+)\)$", str(info.value))
    assert hint[1] == why
    key, _, value = hint[2].partition("=")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # steps=12 is below the tiny preset's warmup
        followed = resolve_config("tiny", [hint[2]])
    assert config_value(followed, key) == meant and type(config_value(followed, key)) is type(meant)


def test_an_odd_head_size_is_refused_for_rope_architectures_only():
    from transformers import LlamaConfig

    with pytest.raises(Exception, match="RoPE requires an even rotary dimension"):  # what LLaMA would meet after the tokenizer
        LlamaConfig(hidden_size=10, num_attention_heads=2)
    with pytest.raises(ConfigError, match=r"^config value model.hidden_size=10 is invalid: LLaMA's rotary position embedding "
                                          r"needs an even head size, not model.hidden_size / model.num_heads = 5; "
                                          r"e.g. model.hidden_size=12$"):
        resolve_config("tiny", ["model.hidden_size=10", "model.num_heads=2"])
    LlamaConfig(hidden_size=12, num_attention_heads=2)  # the size suggested builds
    assert resolve_config("tiny", ["model.hidden_size=10", "model.num_heads=2", "model.hf_config='gpt2'"]).model.hidden_size == 10


def test_warmup_longer_than_the_run_warns():
    with pytest.warns(UserWarning, match=r"optim.warmup_steps=10 is not below steps=5: .* lower optim.warmup_steps"):
        resolve_config("tiny", ["steps=5"])
    resolved_quietly("steps=11")


@pytest.mark.parametrize("rank,said", [("0", True), ("1", False)])
def test_under_torchrun_one_process_says_what_is_wrong_with_the_settings(rank, said, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)  # every process of a torchrun job parses the same command
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--print-config", "steps=5"]) == 0
    assert any("warmup_steps=10 is not below steps=5" in str(w.message) for w in caught) == said
    assert main(["train", "--print-config", "stpes=5"]) == 2
    assert ("unknown config key(s) 'stpes'" in capsys.readouterr().err) == said


@pytest.mark.parametrize("text,message", [
    (b"methods = 5\n", "methods=5 must be a section of [methods.NAME] tables"),
    (b"[methods]\npoet = 5\n", "config section methods.poet must be a table, got 5"),
    (b'name = "caf\xe9"\n', "is not a TOML file: TOML is UTF-8 text, and byte 11 is not UTF-8"),
    (b"[methods.adamw]\nfoo = 1\n", "unknown config key(s) 'methods.adamw.foo'"),  # checked whatever method runs
    (b"[methods.poet-paper.optim]\nlr_poett = 1\n", "'methods.poet-paper.optim.lr_poett'"),
])
def test_hand_edited_files_are_config_errors(text, message, tmp_path):
    path = tmp_path / "edited.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        resolve_config(str(path))
    assert message in str(info.value)


@pytest.mark.parametrize("more", [["seed=1"], ["method='poet-paper'"], ["method='adamw'"], ["method='muon'", "seed=2"]])
def test_a_printed_config_with_more_overrides_resolves_as_the_preset_does(more, tmp_path):
    path = tmp_path / "printed.toml"
    path.write_text(to_toml(resolved_quietly()))
    assert resolve_config(str(path), more) == resolve_config("tiny", more)


def test_resume_refuses_config_like_the_other_flags(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--config", "small"]) == 2
    assert "drop --config " in capsys.readouterr().err


def test_rule_eps_has_its_own_description():
    from poetlm.train.config_text import field_descriptions
    from poetlm.update_rules import RuleConfig

    described = field_descriptions(RuleConfig)
    assert "denominator" in described["eps"] and described["eps"] != described["beta2"]


def test_each_optimizer_group_logs_its_learning_rate():
    from poetlm.train.methods import make_method

    muon = make_method(resolved_quietly("method='muon'", "optim.lr_muon=0.02"))
    assert muon.learning_rates(0.5) == {"lr": 0.005, "lr_muon": 0.01}
    assert make_method(resolved_quietly("method='muon'")).learning_rates(1.0)["lr_muon"] == 3e-3  # tiny's tuned value
    assert make_method(resolved_quietly("method='muon'", "optim.lr_muon=null")).learning_rates(1.0)["lr_muon"] == 0.01  # = lr
    assert make_method(resolved_quietly("method='adamw'", "optim.lr_hidden=1e-3")).learning_rates(1.0) == {"lr": 0.01, "lr_hidden": 1e-3}


@pytest.mark.parametrize("override,key", [
    ("model.num_kv_heads=null", "model.num_kv_heads"), ("optim.lr_muon=None method='muon'", "optim.lr_muon"),
    ("data.max_documents=null", "data.max_documents"), ("data.split_seed=null", "data.split_seed"),
    ("logging.wandb_mode=null", "logging.wandb_mode"), ("data.tokenizer=null", "data.tokenizer"),
    ("poet.target_modules=null", "poet.target_modules"),
])
def test_null_on_the_command_line_unsets_a_key(override, key):
    from poetlm.train.config import config_value

    assert config_value(resolved_quietly(*override.split()), key) is None


def test_a_quoted_null_is_a_string_and_a_key_without_null_says_so():
    assert resolved_quietly('data.tokenizer="null"').data.tokenizer == "null"
    with pytest.raises(ConfigError, match="steps cannot be null"):
        resolved_quietly("steps=null")


@pytest.mark.parametrize("override,hint", [
    ("activation_checkpointing=True", "activation_checkpointing=true"),
    ("poet.exclude_modules=mlp", """poet.exclude_modules='["mlp"]'"""),
    ("optim.lr=.001", "optim.lr=0.001"),
    ("name=123", """name='"123"'"""),
])
def test_type_errors_say_how_to_write_the_value(override, hint):
    with pytest.raises(ConfigError) as info:
        resolved_quietly(override)
    assert hint in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv,example", [
    (["train", "--lr", "1e-3"], "e.g. optim.lr=1e-3 "), (["train", "--optim.lr=3e-3"], "e.g. optim.lr=3e-3 "),
    (["finetune", "--model", "m", "--data", "d", "--warmup-steps", "5"], "e.g. optim.warmup_steps=5 "),
])
def test_a_setting_given_as_a_flag_is_shown_as_key_equals_value(argv, example, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert example in capsys.readouterr().err


def test_config_lists_lora_without_a_base_model_which_a_lora_run_still_needs(capsys):
    assert main(["config", "--config", "finetune", "--method", "lora"]) == 0
    out = capsys.readouterr().out
    assert "finetune.lora_rank" in out and "(what `poetlm finetune --model MODEL --data DATA --config finetune --method lora` runs" in out
    with pytest.raises(ConfigError, match="lora needs finetune.base_model"):
        resolved_quietly("method='lora'", preset="finetune")


def test_resume_takes_the_settings_a_resume_may_change_and_refuses_the_others(tmp_path, capsys):
    from poetlm.train.config import save_config

    save_config(resolved_quietly(), tmp_path / "config.json")
    assert main(["train", "--resume", str(tmp_path), "steps=14", "--no-progress", "--device", "cpu", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "steps = 14" in printed and "progress = false" in printed and 'device = "cpu"' in printed
    assert main(["train", "--resume", str(tmp_path), "optim.lr=1e-3"]) == 2
    assert "--resume cannot change optim.lr: " in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--steps", "5", "steps=12"], "--steps and steps=… both set steps: give it once"),
    (["--method", "adamw", "method='muon'"], "--method and method=… both set method"),
    (["--no-progress", "progress=true"], "--no-progress and progress=… both set progress"),
    (["--model-config", "gpt2", "model.hf_config='gpt2'"], "--model-config and model.hf_config=… both set model.hf_config"),
])
def test_a_key_set_by_a_flag_and_by_key_value_is_refused(argv, message, capsys):
    assert main(["train", "--print-config", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_printed_config_says_where_to_edit_what_the_methods_table_sets(capsys):
    """Edited in the top-level [poet] section, tiny's block size would stay the one poet's own table sets."""
    assert main(["train", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "block_size = 32  # method poet uses 384, from [methods.poet.poet] below: edit it there" in printed
    assert main(["train", "--print-config", "--config", "llama-60m", "--method", "adamw"]) == 0
    assert "# lr_hidden is unset (null)  # method adamw uses 0.001, from [methods.adamw.optim] below" in capsys.readouterr().out


def test_diagnostics_that_miss_the_logged_steps_are_warned_about():
    with pytest.warns(UserWarning, match=r"diagnostics_every=7 is not a multiple of log_every=5: .* so every 35 steps"):
        resolve_config("tiny", ["log_every=5", "diagnostics_every=7"])
    resolved_quietly("log_every=5", "diagnostics_every=10")


def test_train_with_the_finetune_preset_and_no_base_model_is_refused(capsys):
    assert main(["train", "--config", "finetune", "steps=1"]) == 2
    assert "the finetune preset finetunes a model: run poetlm finetune --model DIR" in capsys.readouterr().err


def test_name_prefix_is_a_key_an_override_may_set_too():
    """--print-config writes it and a file may hold it, but as KEY=VALUE it was an unknown key."""
    assert resolve_config("tiny", ["name_prefix=mine", "method=adamw"]).name == "mine-adamw"
    assert resolve_config("tiny", ["name_prefix=mine", "name=given"]).name == "given"
    with pytest.raises(ConfigError, match="name_prefix"):
        resolve_config("tiny", ["name_prefix=3"])
