import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import poetlm
from poetlm import POETConfig
from poetlm.adapter import AdapterError, MergeHistory, base_fingerprint, load_adapter, save_adapter

# A typical finetune targets a few projections; down_proj makes one side longer than the other.
CONFIG = dict(init="keep", block_size=4, seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(123))


def llama(seed=0, hidden=32, layers=2):
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_base(path):
    return LlamaForCausalLM.from_pretrained(path).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finetuned(base_dir, tmp_path_factory):
    """Five AdamW steps on random tokens, rotations and norms trained, a merge every 2 steps."""
    model = poetlm.poetize(load_base(base_dir), POETConfig(**CONFIG))
    fingerprint = base_fingerprint(model)
    for name, param in model.named_parameters():
        param.requires_grad = "rotation_" in name or "norm" in name
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "rotation_" not in n]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = MergeHistory()
    tokens = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        ids = torch.randint(0, 64, (4, 12), generator=tokens)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            history.record(model)
            poetlm.merge(model, optimizer)
    path = tmp_path_factory.mktemp("adapter") / "run.safetensors"
    save_adapter(model, path, history=history, trained=trained, base_fingerprint=fingerprint)
    return model.eval(), path, trained


def test_adapter_on_a_fresh_base_reproduces_the_finetuned_logits(base_dir, finetuned):
    model, path, trained = finetuned
    expected, base = logits(model), logits(load_base(base_dir))
    assert (expected - base).abs().max() > 1e-2  # the finetune moved the model
    loaded = load_adapter(load_base(base_dir), path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    assert all(int(layer.merge_count) == 2 for _, layer in poetlm.poet_layers(loaded))
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["poetlm_adapter"])
    assert info["merges"] == 2 and info["trained"] == trained and any("norm" in n for n in trained)
    assert POETConfig.from_dict(info["config"]) == POETConfig(**CONFIG)
    assert info["layers"]["model.layers.0.mlp.down_proj"] == [48, 32] and len(info["layers"]) == 6
    assert path.stat().st_size < (base_dir / "model.safetensors").stat().st_size / 4
    assert not list(path.parent.glob(".*tmp"))


def test_current_rotations_alone_do_not_reproduce_the_finetune(base_dir, finetuned):
    """Why the history is stored: without replaying the merges, W0 is still the base weight."""
    model, path, _ = finetuned
    naive = poetlm.poetize(load_base(base_dir), POETConfig(**CONFIG))
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name, param in naive.named_parameters():
            if f"current.{name}" in f.keys() or f"trained.{name}" in f.keys():
                key = f"current.{name}" if "rotation_" in name else f"trained.{name}"
                param.copy_(f.get_tensor(key))
    assert (logits(naive) - logits(model)).abs().max() > 1e-3


def with_layers_of(base_dir, layers):
    model = llama(seed=5, layers=layers)
    model.load_state_dict(load_base(base_dir).state_dict(), strict=False)  # same weights where layers overlap
    return model


@pytest.mark.parametrize("make_base,match", [
    (lambda d: llama(hidden=48), r"different base model: layer 'model\.layers\.0\.self_attn\.q_proj' is \(in, out\) shape \(48, 48\)"),
    (lambda d: llama(seed=1), r"different base model: the weights of .* differ"),
    (lambda d: with_layers_of(d, 1), r"different base model: the base has no layer\(s\) \['model\.layers\.1\."),
    (lambda d: with_layers_of(d, 3), r"different base model: the base has extra layer\(s\) \['model\.layers\.2\."),
])
def test_wrong_base_is_refused(base_dir, finetuned, make_base, match):
    with pytest.raises(AdapterError, match=match):
        load_adapter(make_base(base_dir), finetuned[1])


def test_unreadable_or_foreign_files_are_refused(tmp_path, base_dir, finetuned):
    path = finetuned[1]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    bad_metadata = tmp_path / "bad_metadata.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad_metadata), metadata={"poetlm_adapter": "{"})
    cases = [(tmp_path / "missing.safetensors", "no adapter file there"), (truncated, "truncated or corrupt"),
             (garbage, "truncated or corrupt"), (base_dir / "model.safetensors", "not a poetlm adapter"),
             (bad_metadata, "metadata is corrupt")]
    for file, match in cases:
        with pytest.raises(AdapterError, match=match) as caught:
            load_adapter(llama(), file)
        assert str(file) in str(caught.value)


def test_merge_history_round_trips_and_refuses_missed_records():
    model = poetlm.poetize(llama(), POETConfig(init="keep", block_size=4))
    history = MergeHistory()
    for scale in (0.1, 0.2):
        with torch.no_grad():
            for param in poetlm.rotation_parameters(model):
                param.normal_(std=scale)
        history.record(model)
        poetlm.merge(model)
    buffer = io.BytesIO()
    torch.save({"history": history.state_dict()}, buffer)
    buffer.seek(0)
    restored = MergeHistory()
    restored.load_state_dict(torch.load(buffer, weights_only=True)["history"])
    assert len(restored) == 2
    for ours, theirs in zip(history.records, restored.records):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert all(t.abs().sum() > 0 for t in theirs.values())  # snapshots, not views of the zeroed parameters
    restored.record(model)  # a resumed run carries on at merge count 2
    assert len(restored) == 3
    with pytest.raises(ValueError, match="record"):
        MergeHistory().record(model)
    with pytest.raises(ValueError, match="record"):
        save_adapter(model, "unused.safetensors", history=MergeHistory())
    with pytest.raises(ValueError, match="right after poetize"):
        save_adapter(model, "unused.safetensors", history=history)


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def finetune(model, merges, config=None):
    """Random rotations folded in `merges` times, with the history recorded; returns (model, history, fingerprint)."""
    model = poetlm.poetize(model, config or POETConfig(init="keep", block_size=4))
    fingerprint, history = base_fingerprint(model), MergeHistory()
    for i in range(merges + 1):
        with torch.no_grad():
            for param in poetlm.rotation_parameters(model):
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(i))
        if i < merges:
            history.record(model)
            poetlm.merge(model)
    return model, history, fingerprint


def test_gpt2_conv1d_adapter_round_trip(tmp_path):
    model, history, fingerprint = finetune(gpt2(), merges=2)
    assert {type(m).__name__ for _, m in poetlm.poet_layers(model)} == {"POETConv1D"}
    save_adapter(model, tmp_path / "a.safetensors", history=history, base_fingerprint=fingerprint)
    loaded = load_adapter(gpt2(), tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="weights of .* differ"):
        load_adapter(gpt2(seed=1), tmp_path / "a.safetensors")


def test_a_layer_whose_history_outgrows_its_weight_stores_w0_instead(tmp_path):
    """block 16 on 32-wide layers: r = 2·2·120 = 480 per merge for a 1024-entry q_proj, so from the third
    merge on its W0 is smaller than its history; the 48-wide down_proj (r = 600, 1536 entries) too."""
    config = POETConfig(init="keep", block_size=16, target_modules=["q_proj", "down_proj"])
    model, history, fingerprint = finetune(llama(), merges=5, config=config)
    assert len(history) == 5 and history.records[0] == {}  # every layer dropped from the records
    save_adapter(model, tmp_path / "a.safetensors", history=history, base_fingerprint=fingerprint)
    info = poetlm.adapter.read_adapter_info(tmp_path / "a.safetensors")
    assert info["merges"] == 5 and len(info["stored_w0"]) == 4
    restored = MergeHistory()
    loaded = load_adapter(llama(), tmp_path / "a.safetensors", history=restored)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)
    for (_, ours), (_, theirs) in zip(poetlm.poet_layers(model), poetlm.poet_layers(loaded)):
        assert torch.equal(ours.weight0, theirs.weight0) and torch.equal(ours.probe_rotated, theirs.probe_rotated)
        assert int(theirs.merge_count) == 5 and torch.equal(ours.rotation_in.index, theirs.rotation_in.index)
    # Size: per layer min(history, W0) + current rotations, far below 5 merges of history.
    entries = sum(min(5 * r, w) + r for r, w in [(480, 1024), (600, 1536)]) * 2  # two decoder blocks
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() for k in f.keys() if not k.startswith("probe_rotated."))
    assert stored == entries
    # Training goes on: the restored history keeps recording and saving.
    restored.record(loaded)
    poetlm.merge(loaded)
    save_adapter(loaded, tmp_path / "b.safetensors", history=restored, base_fingerprint=info["base_fingerprint"])
    assert poetlm.adapter.read_adapter_info(tmp_path / "b.safetensors")["merges"] == 6


def test_an_adapter_applies_to_its_base_loaded_in_another_dtype(tmp_path, base_dir, finetuned):
    path = finetuned[1]
    exact = load_adapter(load_base(base_dir), path)
    rounded = load_adapter(LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.bfloat16), path)
    layers = dict(poetlm.poet_layers(exact))
    base = dict(load_base(base_dir).named_modules())
    for name, layer in poetlm.poet_layers(rounded):
        # The same merges on the rounded base: orthogonal maps keep the distance, so W0 differs from the
        # fp32 replay exactly as much as the bf16 weight differs from the fp32 one.
        rounding = (base[name].weight - base[name].weight.bfloat16().float()).detach()
        assert float(rounding.norm()) > 0
        assert float((layer.weight0 - layers[name].weight0).norm()) == pytest.approx(float(rounding.norm()), rel=1e-3)
    with pytest.raises(AdapterError, match=r"different base model: the weights of .* differ"):
        load_adapter(llama(seed=1).to(torch.bfloat16), path)  # still compared, at bf16

    model, history, fingerprint = finetune(llama().to(torch.bfloat16), merges=1)  # made on a bf16 base
    save_adapter(model, tmp_path / "bf16.safetensors", history=history, base_fingerprint=fingerprint)
    load_adapter(llama(), tmp_path / "bf16.safetensors")  # the fp32 weights it was rounded from
    with pytest.raises(AdapterError, match=r"^\S+: the base was loaded as float16 but this adapter was made on bfloat16: "
                                           r"load the base with torch_dtype=torch.bfloat16$"):
        load_adapter(llama().to(torch.float16), tmp_path / "bf16.safetensors")


def test_load_adapter_takes_the_directory_that_holds_one(tmp_path, base_dir, finetuned):
    """A run directory holds adapter.safetensors, and POETModel.from_pretrained takes directories: so does load_adapter."""
    import shutil

    from poetlm.adapter import ADAPTER_FILE, AdapterError

    model, path, _ = finetuned
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / ADAPTER_FILE)
    torch.testing.assert_close(logits(load_adapter(load_base(base_dir), run)), logits(model), rtol=0, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="a directory without adapter.safetensors"):
        load_adapter(load_base(base_dir), tmp_path / "empty")


def _edited(path, tmp_path, edit_info=None, edit_tensors=None):
    """A copy of the adapter at `path` with its metadata and tensors edited."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    info = json.loads(metadata["poetlm_adapter"])
    (edit_info or (lambda info: None))(info)
    (edit_tensors or (lambda tensors: None))(tensors)
    out = tmp_path / f"edited{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(out), metadata={**metadata, "poetlm_adapter": json.dumps(info)})
    return out


def _nan_rotation(tensors):
    key = next(key for key in tensors if key.startswith("current."))
    tensors[key] = torch.full_like(tensors[key], float("nan"))


@pytest.mark.parametrize("edit_info,edit_tensors,match", [
    (lambda info: info.update(merges=1), None, r"records 1 merge\(s\) but holds the rotations of merge\(s\) \[0, 1\]"),
    (lambda info: info.update(merges=-1), None, "records -1 merges"),
    (None, _nan_rotation, "holds NaN or inf"),
    (lambda info: info["base_fingerprint"].pop("model.layers.0.self_attn.q_proj"), None,
     r"no valid entry for layer 'model\.layers\.0\.self_attn\.q_proj'"),
    (lambda info: info["base_fingerprint"].update({"model.layers.0.self_attn.q_proj": 7}), None, "no valid entry"),
])
def test_an_adapter_that_disagrees_with_itself_is_refused(tmp_path, base_dir, finetuned, edit_info, edit_tensors, match):
    """A replay of edited metadata would build another model than the one trained, or fail deep inside."""
    edited = _edited(finetuned[1], tmp_path, edit_info, edit_tensors)
    with pytest.raises(AdapterError, match=match + ".*save the adapter again"):
        load_adapter(load_base(base_dir), edited)


def test_a_base_without_a_trained_parameter_is_refused_before_it_is_wrapped(tmp_path, base_dir, finetuned):
    edited = _edited(finetuned[1], tmp_path, lambda info: info["trained"].append("model.extra.weight"),
                     lambda tensors: tensors.update({"trained.model.extra.weight": torch.zeros(3)}))
    base = load_base(base_dir)
    with pytest.raises(AdapterError, match="trained 'model.extra.weight', which the base model does not have"):
        load_adapter(base, edited)
    assert not list(poetlm.poet_layers(base))  # untouched: another adapter can go on it
    torch.testing.assert_close(logits(load_adapter(base, finetuned[1])), logits(finetuned[0]), rtol=0, atol=0)
