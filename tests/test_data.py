"""Tests for poetlm.train.data and poetlm.train.evaluate, on tiny corpora built in tmp_path."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from poetlm.train import data as D
from poetlm.train.data import (
    DataError,
    TokenData,
    load_tokenizer,
    make_batch,
    prepare_data,
    read_documents,
    sample_offsets,
    split_documents,
    _passages,
    _unit_hash,
    PASSAGE_CHARS,
    train_tokenizer,
    val_windows,
)
from poetlm.train.evaluate import perplexity

WORDS = "the king shall speak of war and peace, while the people ask: why? Ünïcode café 😀 tax".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 3))]
        docs.append(f"doc {i}: " + "\n".join(lines))
    return docs


def write_txt(path, docs):
    # vary the separators: one or several blank lines, some with stray whitespace
    seps = ["\n\n", "\n\n\n", "\n  \n"]
    path.write_text("".join(d + seps[i % 3] for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path, docs):
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    return path


# --------------------------------------------------------------------------- reading


def test_read_txt_splits_on_blank_lines_and_strips(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("  first doc\n  second line  \n\n\n\nsecond\n \t \nthird\n\n\n", encoding="utf-8")
    assert read_documents(str(path)) == ["first doc\n  second line", "second", "third"]
    assert read_documents(str(path), max_documents=2) == ["first doc\n  second line", "second"]


def test_read_compressed_txt(tmp_path):
    import gzip

    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a\n\nb\n")
    assert read_documents(str(tmp_path / "c.txt.gz")) == ["a", "b"]


def test_read_jsonl_and_parquet(tmp_path):
    docs = make_docs(7)
    jsonl = write_jsonl(tmp_path / "c.jsonl", docs)
    with open(jsonl, "a", encoding="utf-8") as f:  # blank lines and empty texts are skipped
        f.write('\n{"text": "   "}\n{"text": "last"}\n')
    assert read_documents(str(jsonl)) == docs + ["last"]
    parquet = write_parquet(tmp_path / "c.parquet", docs + ["", "  "])
    assert read_documents(str(parquet)) == docs
    assert read_documents(str(parquet), max_documents=3) == docs[:3]
    pq.write_table(pa.table({"text": [b"bytes doc"]}), tmp_path / "binary.parquet")  # was dropped without a word
    with pytest.raises(DataError, match='binary.parquet, row 1: "text" is a bytes, not a string'):
        read_documents(str(tmp_path / "binary.parquet"))


def test_read_directory_in_sorted_order(tmp_path):
    docs = make_docs(9)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    write_txt(root / "a.txt", docs[:3])
    write_parquet(root / "b.parquet", docs[3:6])
    write_jsonl(root / "sub" / "c.jsonl", docs[6:])
    (root / "README.md").write_text("not data")  # unsupported files in a directory are left out, with a warning
    (root / "sub" / "more.csv").write_text("text\nnot read")
    (root / ".hidden.csv").write_text("hidden files are nobody's data")
    with pytest.warns(UserWarning, match=r"read 3 data file\(s\) and skipped 2 other file\(s\): README.md, sub/more.csv, of no format"):
        assert read_documents(str(root)) == docs


def test_a_directory_follows_linked_directories_and_reads_each_file_once(tmp_path):
    docs = make_docs(6)
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    write_txt(root / "a" / "x.txt", docs[:2])
    write_txt(root / "b.txt", docs[2:4])
    write_txt(elsewhere / "e.txt", docs[4:])
    (root / "linked").symlink_to(elsewhere)  # was skipped without a word
    (root / "a" / "loop").symlink_to(root)  # a cycle ends
    (root / "c.txt").symlink_to(root / "b.txt")  # the same documents twice could land in both splits
    assert read_documents(str(root)) == docs


@pytest.mark.parametrize("name", ["shakespeare", "sotu"])
def test_bundled_corpora(name):
    docs = read_documents(name, max_documents=20)
    assert len(docs) == 20
    assert docs[0].strip() and all(d == d.strip() and d for d in docs)


@pytest.mark.parametrize("writer", [write_parquet, write_jsonl])
def test_hf_local_directory_matches_direct_read(tmp_path, writer):
    pytest.importorskip("datasets")
    docs = make_docs(10)
    root = tmp_path / "hfdata"
    root.mkdir()
    ext = "parquet" if writer is write_parquet else "jsonl"
    writer(root / f"part-0.{ext}", docs[:4])
    writer(root / f"part-1.{ext}", docs[4:])
    assert read_documents(f"hf:{root}") == read_documents(str(root)) == docs
    assert read_documents(f"hf:{root}", max_documents=5) == docs[:5]
    assert read_documents(f"hf:{root}:default") == docs  # a local directory with a config name is no hub stream either


def test_hf_home_directory_is_expanded_for_datasets_too(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "hfd").mkdir()
    write_jsonl(tmp_path / "hfd" / "train.jsonl", ["a", "b"])
    assert read_documents("hf:~/hfd") == ["a", "b"]


def test_hf_local_directory_without_documents_or_a_train_split_says_so(tmp_path):
    """Both were reported as a dataset that does not exist or a Hub that is unreachable."""
    pytest.importorskip("datasets")
    for name, text in (("empty", ""), ("blank", '{"text": "  "}\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text(text)
        with pytest.raises(DataError) as hf:
            read_documents(f"hf:{tmp_path / name}")
        with pytest.raises(DataError) as plain:  # what --data DIR says
            read_documents(str(tmp_path / name))
        assert str(hf.value).replace("hf:", "") == str(plain.value)
        assert str(hf.value).startswith(f"no documents found in 'hf:{tmp_path / name}'")
    (tmp_path / "held-out").mkdir()
    write_jsonl(tmp_path / "held-out" / "validation.jsonl", ["a", "b"])
    with pytest.raises(DataError, match=r"^hf:\S+held-out has no train split \(found: validation\): .* name the training "
                                        r"files train\.\*") as info:
        read_documents(f"hf:{tmp_path / 'held-out'}")
    assert "Hub" not in str(info.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no data here")
    with pytest.raises(DataError, match=r"^datasets cannot read the directory hf:\S+notes \(.*\); fix its files, or use "
                                        r"--data PATH"):
        read_documents(f"hf:{tmp_path / 'notes'}")


# --------------------------------------------------------------------------- read errors


def _bad_source(tmp_path, kind):
    if kind == "missing":
        return str(tmp_path / "nope.txt"), ["nope.txt", "existing file", "sotu"]
    if kind == "unknown_bundled":
        return "sotuu", ["sotuu", "sotu", "shakespeare"]
    if kind == "empty":
        (tmp_path / "e.txt").write_text("")
        return str(tmp_path / "e.txt"), ["no documents", "e.txt"]
    if kind == "whitespace":
        (tmp_path / "w.txt").write_text("\n  \n\n\t\n")
        return str(tmp_path / "w.txt"), ["no documents"]
    if kind == "bad_json":
        (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
        return str(tmp_path / "b.jsonl"), ["b.jsonl", "line 3", "invalid JSON"]
    if kind == "jsonl_no_text":
        (tmp_path / "n.jsonl").write_text('{"body": "x"}\n')
        return str(tmp_path / "n.jsonl"), ["n.jsonl", "line 1", '"text"', "body"]
    if kind == "jsonl_surrogate":  # valid JSON, but no text: the escape is half of a UTF-16 pair
        (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 x"}\n')
        return str(tmp_path / "s.jsonl"), ["s.jsonl", "line 2", "unpaired surrogate", "clean that record"]
    if kind == "jsonl_not_object":
        (tmp_path / "l.jsonl").write_text('["x"]\n')
        return str(tmp_path / "l.jsonl"), ['"text"', "not a JSON object"]
    if kind == "parquet_no_text":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "n.parquet")
        return str(tmp_path / "n.parquet"), ["n.parquet", '"text" column', "body"]
    if kind == "broken_parquet":
        (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet at all")
        return str(tmp_path / "x.parquet"), ["x.parquet", "parquet"]
    if kind == "not_utf8":
        (tmp_path / "l1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
        return str(tmp_path / "l1.txt"), ["UTF-8"]
    if kind == "unsupported":
        (tmp_path / "d.csv").write_text("text\nx\n")
        return str(tmp_path / "d.csv"), ["d.csv", ".txt", ".jsonl", ".parquet"]
    if kind == "empty_dir":
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "notes.md").write_text("x")
        (tmp_path / "dir" / ".draft.txt").write_text("hidden, so skipped: the message must say why it was not read")
        return str(tmp_path / "dir"), ["no .txt, .jsonl or .parquet", "hidden files and folders"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["missing", "unknown_bundled", "empty", "whitespace", "bad_json", "jsonl_no_text", "jsonl_surrogate", "jsonl_not_object",
     "parquet_no_text", "broken_parquet", "not_utf8", "unsupported", "empty_dir"],
)
def test_read_errors_name_problem_and_fix(tmp_path, kind):
    source, fragments = _bad_source(tmp_path, kind)
    with pytest.raises(DataError) as info:
        read_documents(source)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_hf_unreachable_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # read_documents flips these module flags when HF_HUB_OFFLINE is set; let monkeypatch undo that
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        read_documents("hf:poetlm-test-nonexistent/does-not-exist:en", max_documents=3)
    msg = str(info.value)
    assert "poetlm-test-nonexistent/does-not-exist" in msg
    assert "no network" in msg and "--data PATH" in msg


@pytest.mark.parametrize("module, source_kind", [("pyarrow", "parquet"), ("datasets", "hf")])
def test_missing_optional_dependency(tmp_path, monkeypatch, module, source_kind):
    path = write_parquet(tmp_path / "c.parquet", ["x"])
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    source = str(path) if source_kind == "parquet" else f"hf:{tmp_path}"
    with pytest.raises(DataError, match=r"pip install 'poetlm\[data\]'"):
        read_documents(source)


# --------------------------------------------------------------------------- splitting


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i}" for i in range(200)]
    train, val = split_documents(docs, 0.2, seed=3)
    assert (train, val) == split_documents(list(docs), 0.2, seed=3)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    # order within each split follows the corpus
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    assert 20 <= len(val) <= 60
    assert split_documents(docs, 0.2, seed=4)[1] != val


def test_split_membership_by_index_only():
    a = [f"a{i}" for i in range(50)]
    b = [f"completely different text {i}" for i in range(50)]
    val_a = {int(d[1:]) for d in split_documents(a, 0.3, seed=7)[1]}
    val_b = {int(d.split()[-1]) for d in split_documents(b, 0.3, seed=7)[1]}
    assert val_a == val_b


@pytest.mark.slow
def test_split_independent_of_hash_randomization():
    code = (
        "from poetlm.train.data import split_documents;"
        "print(split_documents([f'd{i}' for i in range(60)], 0.25, 11)[1])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(split_documents([f"d{i}" for i in range(60)], 0.25, 11)[1])


def test_split_edge_cases():
    assert split_documents(["a", "b"], 0.001, 0) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_documents(["a", "b"], 0.999, 0) in ((["a"], ["b"]), (["b"], ["a"]))
    with pytest.raises(DataError, match="too short to cut into a training and a validation part"):
        split_documents(["only"], 0.1, 0)


def test_a_corpus_that_is_one_document_is_split_as_passages_at_line_ends():
    lines = [f"verse {i}: " + " ".join(WORDS) for i in range(3000)]  # ~100 characters a line, no blank lines
    train, val = split_documents(["\n".join(lines)], 0.1, seed=0)
    assert len(val) >= 1 and len(train) > 5 * len(val)
    passages = [p.split("\n") for p in train + val]
    assert sorted(line for p in passages for line in p) == sorted(lines)  # cut at line ends, nothing lost
    assert all(len("\n".join(p)) < PASSAGE_CHARS + 200 for p in passages)
    assert (train, val) == split_documents(["\n".join(lines)], 0.1, seed=0)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(["a", "b"], 1.5, 0)
    # A title before the book: two documents, but split whole the validation set could be the title alone.
    titled_train, titled_val = split_documents(["The Book", "\n".join(lines)], 0.1, seed=0)
    assert len(titled_train) + len(titled_val) == len(train) + len(val) + 1
    assert min(sum(map(len, titled_train)), sum(map(len, titled_val))) > 1000  # text on both sides, not the title alone


POEM = "\n".join(f"This is sentence number {i} of the poem." for i in range(700))  # ~28k characters, no blank line


@pytest.mark.parametrize("docs", [[POEM], ["A Title", POEM], [POEM, POEM[:9000], POEM[:3000]]],
                         ids=["one document", "titled", "few documents"])
@pytest.mark.parametrize("val_fraction", [0.05, 0.3])
def test_a_corpus_of_few_long_documents_holds_out_about_val_fraction(docs, val_fraction):
    for seed in range(4):
        train, val = split_documents(docs, val_fraction, seed)
        assert (train, val) == split_documents(docs, val_fraction, seed)
        share = sum(map(len, val)) / sum(map(len, train + val))
        assert 0.5 * val_fraction <= share <= 2 * val_fraction, (seed, share)


@pytest.mark.parametrize("layout", ["one line", "three records", "no spaces"])
def test_text_without_line_ends_is_cut_at_whitespace_and_holds_out_about_val_fraction(layout):
    """A text8-style corpus was refused, and records exported without line ends were split whole: a third of
    the corpus, or one short record, held out."""
    text = " ".join(f"{WORDS[i % len(WORDS)]}{i % 977}" for i in range(250_000))
    docs = {"one line": [text], "three records": [text[i::3] for i in range(3)],
            "no spaces": ["字" * 600_000]}[layout]
    for seed in range(3):
        train, val = split_documents(docs, 0.05, seed)
        share = sum(map(len, val)) / sum(map(len, train + val))
        assert 0.025 <= share <= 0.1, (seed, share)
        assert max(map(len, train + val)) <= 2 * PASSAGE_CHARS
        kept = sum(len(part.replace(" ", "")) for part in train + val)
        assert kept == sum(len(doc.replace(" ", "")) for doc in docs)  # only the whitespace at the cuts goes


def test_a_book_with_some_very_long_lines_keeps_its_membership_by_hash():
    """kjv has lines of up to 225k characters; cut at line ends it holds out about val_fraction, so it keeps the
    split by hash it always had (its published numbers): whitespace cutting is only for where that fails."""
    verse = "and the light was good, and the evening and the morning were a day. "
    lines = [f"Verse {i}: {verse}" * (700 if i % 4000 == 0 else 1) for i in range(40_000)]
    book = "\n".join(lines)
    assert max(map(len, lines)) > 2 * PASSAGE_CHARS
    passages, start = [], 0  # the rule as it always was, written out: cut after the first line end past 20k
    while start < len(book):
        end = book.find("\n", start + PASSAGE_CHARS)
        end = len(book) if end < 0 else end + 1
        passages.append(book[start:end].strip())
        start = end
    by_hash = [p for i, p in enumerate(passages) if _unit_hash(0, i) < 0.05]
    assert split_documents([book], 0.05, seed=0)[1] == by_hash


def test_a_small_text_of_long_lines_is_still_cut_at_its_line_ends():
    small = "\n".join(f"line {i} " + "word " * 48 for i in range(20))  # 20 lines of ~250 characters
    train, val = split_documents([small], 0.05, seed=0)
    assert (len(train), len(val)) == (19, 1)


def test_a_book_of_many_passages_keeps_its_membership_by_hash():
    """Where the passages' own hashes hold out about val_fraction (a large book: web, kjv), the split is the one
    poetlm always made, so earlier runs' validation sets and their published numbers stay reproducible."""
    book = "\n".join(f"Verse {i}: and the light was good, and the evening and the morning were a day." for i in range(40_000))
    passages = _passages(book, PASSAGE_CHARS)
    by_hash = [p for i, p in enumerate(passages) if _unit_hash(0, i) < 0.05]
    assert len(passages) > 100 and split_documents([book], 0.05, seed=0)[1] == by_hash


def test_the_held_out_tokens_of_a_one_document_corpus_are_about_val_fraction(tmp_path):
    (tmp_path / "poem.txt").write_text(POEM + "\n")
    tokens = prepare_data(str(tmp_path / "poem.txt"), tokenizer=None, vocab_size=300, cache_root=tmp_path / "cache",
                          val_fraction=0.05, split_seed=0)
    assert 0.02 <= len(tokens.val) / (len(tokens.train) + len(tokens.val)) <= 0.1  # was 0.72: most of the text


# --------------------------------------------------------------------------- tokenizers


def test_train_and_load_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    docs = make_docs(60)
    tok = train_tokenizer(docs, 300, tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(tmp_path / "tok")
    for t in (tok, again, loaded):
        assert len(t) == 300
        assert t.eos_token == t.bos_token == t.pad_token == t.unk_token == "<|endoftext|>"
    text = "  leading space, the kïng 😀 — never-seen bytes \x01\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert max(ids) < 300


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load"):
        load_tokenizer(tmp_path / "junk")

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path / "noeos"))
    with pytest.raises(DataError, match="no eos token"):
        load_tokenizer(tmp_path / "noeos")


def test_load_tokenizer_refuses_a_directory_without_a_usable_tokenizer(tmp_path):
    """transformers builds a tokenizer anyway (from a model's config.json, or from an empty vocabulary) that encodes
    every text to no tokens: evaluating or training with it would read only end-of-text tokens."""
    from transformers import AutoTokenizer, GPT2Config

    weights_only = tmp_path / "weights-only"
    GPT2Config(vocab_size=300).save_pretrained(weights_only)
    assert AutoTokenizer.from_pretrained(weights_only)("the king", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(DataError, match=f"^{weights_only} has no tokenizer files .*; pass a directory written by"):
        load_tokenizer(weights_only)

    empty = tmp_path / "empty-vocabulary"
    empty.mkdir()
    (empty / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0}))
    (empty / "merges.txt").write_text("#version: 0.2\n")
    (empty / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"}))
    assert AutoTokenizer.from_pretrained(empty)("the king", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(DataError, match=f"^tokenizer {empty} encodes text to no tokens"):
        load_tokenizer(empty)


def test_vocab_too_small(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(["abc"], 100, tmp_path / "t")


# --------------------------------------------------------------------------- prepare_data


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(40)
    return write_txt(tmp_path / "corpus.txt", docs), docs


def _prepare(path, cache_root, **kw):
    return prepare_data(str(path), tokenizer=None, vocab_size=320, cache_root=cache_root,
                        val_fraction=0.2, split_seed=1, **kw)


def _decode_docs(td: TokenData, tokens) -> list[str]:
    ids = np.asarray(tokens).tolist()
    assert ids[-1] == td.eos_id
    out, cur = [], []
    for i in ids:
        if i == td.eos_id:
            out.append(td.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(i)
    return out


def test_prepare_data_packs_documents(corpus, tmp_path):
    path, docs = corpus
    td = _prepare(path, tmp_path / "cache")
    assert isinstance(td.train, np.memmap) and isinstance(td.val, np.memmap)
    assert td.train.dtype == np.uint16 and not td.train.flags.writeable
    assert td.vocab_size == 320 and td.eos_id == td.tokenizer.eos_token_id
    train_docs, val_docs = split_documents(docs, 0.2, 1)
    assert _decode_docs(td, td.train) == train_docs
    assert _decode_docs(td, td.val) == val_docs
    assert int((np.asarray(td.train) == td.eos_id).sum()) == len(train_docs)
    meta = json.loads((td.cache_dir / "meta.json").read_text())
    assert meta["n_train"] == len(td.train) and meta["n_val"] == len(td.val)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 320 and meta["eos_id"] == td.eos_id
    # atomic publishing leaves no temp directories behind
    assert os.listdir(td.cache_dir.parent) == [td.cache_dir.name]
    assert len(os.listdir(tmp_path / "cache" / "tokenizers")) == 1


def test_a_literal_end_of_text_in_a_document_stays_text(tmp_path):
    docs = make_docs(40) + ["the page said <|endoftext|> and went on"]
    path = write_txt(tmp_path / "eos.txt", docs)
    td = _prepare(path, tmp_path / "cache")
    train_docs, val_docs = split_documents(docs, 0.2, 1)
    assert _decode_docs(td, td.train) == train_docs and _decode_docs(td, td.val) == val_docs  # no boundary added


def test_prepare_data_reuses_cache(corpus, tmp_path, monkeypatch):
    path, _ = corpus
    first = _prepare(path, tmp_path / "cache")
    stamp = os.stat(first.cache_dir / "train.bin").st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(D, "train_tokenizer", boom)
    monkeypatch.setattr(D, "read_documents", boom)
    second = _prepare(path, tmp_path / "cache")
    assert second.cache_dir == first.cache_dir
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert os.stat(second.cache_dir / "train.bin").st_mtime_ns == stamp

    # an explicit tokenizer directory with the same tokenizer maps to the same token cache
    (tok_dir,) = (tmp_path / "cache" / "tokenizers").iterdir()
    third = prepare_data(str(path), tokenizer=str(tok_dir), vocab_size=999, cache_root=tmp_path / "cache",
                         val_fraction=0.2, split_seed=1)
    assert third.cache_dir == first.cache_dir


def test_prepare_data_key_tracks_inputs(corpus, tmp_path):
    path, docs = corpus
    base = _prepare(path, tmp_path / "cache").cache_dir
    assert _prepare(path, tmp_path / "cache", max_documents=30).cache_dir != base
    write_txt(path, docs + ["a brand new document"])
    assert _prepare(path, tmp_path / "cache").cache_dir != base


def _flip_byte(p):
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-3])


def _bad_meta(p):
    (p.parent / "meta.json").write_text("{ not json")


def _other_tokenizer(p):
    meta_path = p.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt, reason",
    [(_flip_byte, "checksum"), (_truncate, "bytes"), (_bad_meta, "JSONDecodeError"),
     (_other_tokenizer, "different tokenizer")],
)
def test_corrupt_cache_is_rebuilt_with_warning(corpus, tmp_path, corrupt, reason):
    path, _ = corpus
    first = _prepare(path, tmp_path / "cache")
    train, val = np.array(first.train), np.array(first.val)
    meta = (first.cache_dir / "meta.json").read_text()
    del first  # release the memmaps before touching the files
    corrupt(tmp_path / "cache" / "tokens" / os.listdir(tmp_path / "cache" / "tokens")[0] / "train.bin")
    with pytest.warns(UserWarning, match=reason):
        again = _prepare(path, tmp_path / "cache")
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    assert (again.cache_dir / "meta.json").read_text() == meta


def test_a_killed_builds_directory_is_swept_by_the_next_build(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, final = socket.gethostname(), tmp_path / "tokens" / "key"
    final.parent.mkdir()
    stale = final.parent / f".key.{host}.{int(dead.stdout)}.abcd"  # a process that is gone
    live = final.parent / f".key.{host}.{os.getpid()}.efgh"  # a build still running (this process)
    stale.mkdir()
    live.mkdir()
    fresh = D._build_dir(final)
    assert not stale.exists() and live.exists() and fresh.exists() and fresh.name.startswith(f".key.{host}.{os.getpid()}.")


def test_interrupted_build_leaves_no_cache(corpus, tmp_path, monkeypatch):
    path, _ = corpus
    real = D._write_tokens
    calls = []

    def interrupted(p, *a, **k):
        calls.append(p)
        if p.name == "val.bin":
            raise KeyboardInterrupt
        return real(p, *a, **k)

    monkeypatch.setattr(D, "_write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(path, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache" / "tokens") == []
    monkeypatch.setattr(D, "_write_tokens", real)
    td = _prepare(path, tmp_path / "cache")
    assert len(td.train) > 0


def test_prepare_data_errors(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("just a single document\n")
    with pytest.raises(DataError, match="too short to cut into a training and a validation part"):
        _prepare(one, tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(str(one), tokenizer=str(tmp_path / "no-tok"), vocab_size=300, cache_root=tmp_path / "c")


# --------------------------------------------------------------------------- batches


def test_sample_offsets_deterministic_and_in_range():
    a = sample_offsets(1000, step=5, n_rows=16, seq_len=32, seed=0)
    assert np.array_equal(a, sample_offsets(1000, step=5, n_rows=16, seq_len=32, seed=0))
    assert not np.array_equal(a, sample_offsets(1000, step=6, n_rows=16, seq_len=32, seed=0))
    assert not np.array_equal(a, sample_offsets(1000, step=5, n_rows=16, seq_len=32, seed=1))
    assert np.array_equal(a, np.random.default_rng([0, 5]).integers(0, 1000 - 32, 16))
    many = sample_offsets(40, step=0, n_rows=2000, seq_len=32, seed=0)
    assert many.min() == 0 and many.max() == 40 - 33  # the last full window is reachable
    assert (sample_offsets(33, 0, 8, 32, 0) == 0).all()
    with pytest.raises(DataError, match=r"32 tokens, fewer than seq_len\+1=33"):
        sample_offsets(32, 0, 8, 32, 0)


def test_make_batch_shifts_targets(tmp_path):
    arr = np.arange(50, dtype=np.uint16) * 7
    arr.tofile(tmp_path / "t.bin")
    tokens = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    x, y = make_batch(tokens, np.array([0, 10, 41]), 8)
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    assert x[1].tolist() == [7 * i for i in range(10, 18)]
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert y[2, -1].item() == 7 * 49


def test_val_windows():
    tokens = np.arange(10)
    assert val_windows(tokens, 3, None).tolist() == [0, 3, 6]  # predicts tokens 1..9 once each
    assert val_windows(tokens, 3, 6).tolist() == [0, 3]
    assert val_windows(tokens, 3, 8).tolist() == [0, 3]
    assert val_windows(np.arange(4), 3, None).tolist() == [0]
    with pytest.raises(DataError, match="smaller than seq_len"):
        val_windows(tokens, 3, 2)
    with pytest.raises(DataError, match="validation split has 3 tokens"):
        val_windows(np.arange(3), 3, None)


# --------------------------------------------------------------------------- perplexity


class BigramLM(torch.nn.Module):
    """A causal LM whose logits depend only on the current token, so the exact answer is easy."""

    def __init__(self, vocab: int, uniform: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        table = torch.zeros(vocab, vocab) if uniform else torch.randn(vocab, vocab, generator=gen) * 3
        self.table = torch.nn.Parameter(table)
        self.proj = torch.nn.Linear(vocab, vocab)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(vocab))
            self.proj.bias.zero_()

    def forward(self, input_ids, use_cache=None):  # the call of an HF causal LM
        return types.SimpleNamespace(logits=self.proj(self.table[input_ids]))


def _expected_ce(model, tokens, n_pred):
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    with torch.no_grad():
        return F.cross_entropy(model.table[t[:n_pred]], t[1 : n_pred + 1]).item()


def test_perplexity_matches_direct_computation():
    vocab, seq_len = 13, 4
    tokens = np.random.default_rng(0).integers(0, vocab, 31).astype(np.uint16)
    model = BigramLM(vocab)
    # 30 predictable tokens -> 7 windows of 4 = 28 predictions; batch of 3 leaves a ragged last batch
    got = perplexity(model, tokens, seq_len=seq_len, batch_size=3, max_tokens=None, device="cpu")
    want = _expected_ce(model, tokens, 28)
    assert got["val_tokens"] == 28
    assert got["val_loss"] == pytest.approx(want, rel=1e-6)
    assert got["val_ppl"] == pytest.approx(math.exp(want), rel=1e-6)

    capped = perplexity(model, tokens, seq_len=seq_len, batch_size=2, max_tokens=10, device="cpu")
    assert capped["val_tokens"] == 8
    assert capped["val_loss"] == pytest.approx(_expected_ce(model, tokens, 8), rel=1e-6)

    bf16 = perplexity(model, tokens, seq_len=seq_len, batch_size=3, max_tokens=None, device="cpu",
                      autocast_dtype=torch.bfloat16)
    assert bf16["val_loss"] == pytest.approx(want, rel=5e-2)


def test_uniform_model_has_perplexity_vocab_size():
    vocab = 50
    tokens = np.random.default_rng(1).integers(0, vocab, 200)
    got = perplexity(BigramLM(vocab, uniform=True), tokens, seq_len=16, batch_size=4, max_tokens=None,
                     device=torch.device("cpu"))
    assert got["val_ppl"] == pytest.approx(vocab, rel=1e-6)
    assert got["val_tokens"] == (199 // 16) * 16


def test_perplexity_restores_modes():
    tokens = np.arange(20) % 7
    model = BigramLM(7)
    model.train()
    model.proj.eval()  # a deliberately mixed state must survive
    perplexity(model, tokens, seq_len=4, batch_size=2, max_tokens=None, device="cpu")
    assert model.training and not model.proj.training
    model.eval()
    perplexity(model, tokens, seq_len=4, batch_size=2, max_tokens=None, device="cpu")
    assert not model.training


def test_perplexity_shards_across_ranks(monkeypatch):
    vocab, seq_len = 11, 3
    tokens = np.random.default_rng(2).integers(0, vocab, 41)
    model = BigramLM(vocab)
    reduced = []

    def fake_all_reduce(t):
        reduced.append(t.clone())

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    for rank in range(3):
        perplexity(model, tokens, seq_len=seq_len, batch_size=2, max_tokens=None, device="cpu",
                   rank=rank, world_size=3)
    loss_sum, count = torch.stack(reduced).sum(0).tolist()
    assert count == 39  # 13 windows split 5/4/4, every prediction counted once
    assert loss_sum / count == pytest.approx(_expected_ce(model, tokens, 39), rel=1e-6)


def test_hub_stream_needs_an_explicit_document_budget():
    with pytest.raises(DataError, match="data.max_documents=2000000"):
        read_documents("hf:allenai/c4:en")
    with pytest.raises(DataError, match="e.g. --max-documents 2000000"):  # as `poetlm eval` sets it
        read_documents("hf:allenai/c4:en", documents_option="--max-documents {}")


@pytest.mark.parametrize("record", ["{}", "[]", '{"tokenizer_hash": 5}', "null",
                                    '{"identity": {}, "cache_dir": "c", "tokenizer_hash": "h", "sha256_train": "t"}'])
def test_a_wrong_shaped_data_record_is_damaged(tmp_path, record):
    (tmp_path / "data.json").write_text(record)
    with pytest.raises(DataError, match="data.json is missing, unreadable or damaged.*Restore the file"):
        D.load_run_data(tmp_path, "sotu")


@pytest.mark.parametrize("model_type,reloads_otherwise", [("qwen2", True), ("llama", False), ("gpt2", False)])
def test_a_model_directory_whose_tokenizer_transformers_reloads_otherwise_is_warned_about(model_type, reloads_otherwise,
                                                                                         tmp_path, capsys):
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast


    docs = [f"In {1700 + i}, {i * 37} people paid {i * 1234} coins at the café; naïve? ☃ «yes»!" for i in range(200)]
    trained = train_tokenizer(docs, 400, tmp_path / "tokenizer")
    model_dir = tmp_path / "model"
    AutoConfig.for_model(model_type).save_pretrained(model_dir)
    trained.save_pretrained(model_dir)
    ours = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")(D.PROBE_TEXT).input_ids  # the run's own: no config.json
    assert (AutoTokenizer.from_pretrained(model_dir)(D.PROBE_TEXT).input_ids != ours) == reloads_otherwise
    assert PreTrainedTokenizerFast.from_pretrained(model_dir)(D.PROBE_TEXT).input_ids == ours  # what the warning advises
    D.warn_if_reloaded_otherwise(model_dir, trained)
    err = capsys.readouterr().err
    assert bool(err) == reloads_otherwise
    if reloads_otherwise:
        assert err.startswith(f"poetlm: warning: transformers.AutoTokenizer.from_pretrained({str(model_dir)!r}) loads a "
                              "Qwen2Tokenizer, which encodes text into other tokens than the model was trained on")
        assert err.count("\n") == 1 and "PreTrainedTokenizerFast.from_pretrained" in err


def test_a_data_folder_with_a_file_added_or_removed_is_called_changed_not_other_data(tmp_path):
    from poetlm.train.data import _how_it_differs

    then = {"files": [["/d/a.txt", 10, 1], ["/d/b.txt", 20, 1]]}
    assert _how_it_differs({"files": [["/d/a.txt", 10, 1]]}, then) == "changed since this run started"
    assert _how_it_differs({"files": [*then["files"], ["/d/c.txt", 5, 2]]}, then) == "changed since this run started"
    assert _how_it_differs({"files": [["/e/x.txt", 10, 1]]}, then).startswith("is not the data this run started on")
    # one file of the recorded folder is another source, not the folder changed (the other file is still there)
    tmp_path.joinpath("a.txt").write_text("a")
    tmp_path.joinpath("b.txt").write_text("b")
    folder = {"files": [[str(tmp_path / "a.txt"), 1, 1], [str(tmp_path / "b.txt"), 1, 1]]}
    assert _how_it_differs({"files": [[str(tmp_path / "a.txt"), 1, 1]]}, folder).startswith("is not the data")
    assert _how_it_differs({"unknown": str(tmp_path)}, folder) == "is no longer there"
