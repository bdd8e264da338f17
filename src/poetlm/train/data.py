"""Corpus reading, tokenizer training and the on-disk token cache for ``poetlm train``.

Everything here works offline: bundled corpora ship inside the package, local files are
read directly, and ``hf:`` sources only touch the network when the user asks for them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import itertools
import json
import lzma
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from .files import sha256_file
from .hub import honor_offline_env

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"

BUNDLED_CORPORA: dict[str, str] = {
    "sotu": "sotu.txt.xz",
    "shakespeare": "shakespeare.txt.xz",
}

# Bump when the cache layout, packing or split changes so stale caches are never reused
# (2: a corpus with a document longer than val_fraction of its text is split by share).
_CACHE_VERSION = 2
_FORMATS = (".txt", ".jsonl", ".parquet")
_COMPRESSIONS = {".xz": lzma.open, ".gz": gzip.open}
_INSTALL_DATA = "install the optional data dependencies: pip install 'poetlm[data]'"
_TOKENIZE_BATCH = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """A problem with the user's data or tokenizer; the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------
# Reading documents


def read_documents(source: str, *, max_documents: int | None = None, documents_option: str = "data.max_documents={}") -> list[str]:
    """Read the documents of a bundled corpus, a local file/directory, or ``hf:NAME[:CONFIG]``.

    ``.txt`` documents are separated by blank lines and stripped; ``.jsonl``/``.parquet``/hf
    texts are kept verbatim. Whitespace-only documents are dropped everywhere. `documents_option`: how the
    command in use sets max_documents, which a hub stream needs.
    """
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be at least 1, got {max_documents}")
    if source.startswith("hf:") and max_documents is None and not Path(split_hf_spec(source[3:])[0]).is_dir():
        # A hub stream such as C4 has no useful end: poetlm caches a fixed prefix of it, so its size must be chosen.
        raise DataError(f"{source} streams from the Hub: set how many documents to tokenize, "
                        f"e.g. {documents_option.format(2000000)}")
    docs_iter = _iter_documents(source)
    try:
        docs = list(itertools.islice(docs_iter, max_documents))
    finally:
        docs_iter.close()  # closes the open file now rather than at garbage collection
    if not docs:
        raise DataError(
            f"no documents found in {source!r} (empty, or only whitespace); "
            "point --data at a corpus that contains text"
        )
    return docs


def _iter_documents(source: str) -> Iterator[str]:
    if source.startswith("hf:"):
        yield from _iter_hf(source[3:])
        return
    path = Path(source).expanduser()
    if path.exists():
        yield from _iter_path(path)
        return
    if source in BUNDLED_CORPORA:
        yield from _iter_txt(_bundled_path(source))
        return
    raise DataError(
        f"{source!r} is neither a bundled corpus ({', '.join(BUNDLED_CORPORA)}) nor an existing "
        "file or directory; pass a bundled name, a .txt/.jsonl/.parquet file or a directory of "
        "them, or hf:NAME[:CONFIG]"
    )


def _bundled_path(name: str) -> Path:
    path = Path(str(importlib.resources.files("poetlm") / "corpora" / BUNDLED_CORPORA[name]))
    if not path.is_file():
        raise DataError(f"bundled corpus file {path} is missing; reinstall poetlm")
    return path


def _format_of(path: Path) -> str | None:
    """The data format (".txt", ".jsonl", ".parquet") of a file, looking through .xz/.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None  # parquet compresses internally; an outer layer can't be streamed
    return suffixes[-1] if suffixes and suffixes[-1] in _FORMATS else None


def _data_files(root: Path) -> tuple[list[Path], list[str]]:
    """Supported files under a directory, in a stable order, and the names of the others (hidden files are
    nobody's data). Linked directories are followed (each real directory once, so a link cycle ends) and each
    real file is read once: a document reached twice could land in both the training and the validation split."""
    files, directories = [], set()
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        if os.path.realpath(directory) in directories:
            subdirectories[:] = []
            continue
        directories.add(os.path.realpath(directory))
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        files += [Path(directory, name) for name in names if not name.startswith(".")]
    skipped = sorted(str(p.relative_to(root)) for p in files if p.is_file() and _format_of(p) is None)
    files = sorted((p for p in files if p.is_file() and _format_of(p) is not None), key=lambda p: p.relative_to(root).parts)
    unique, real = [], set()
    for path in files:
        if path.resolve() not in real:
            real.add(path.resolve())
            unique.append(path)
    return unique, skipped


def _iter_path(path: Path) -> Iterator[str]:
    if path.is_dir():
        files, skipped = _data_files(path)
        listed = f"{len(skipped)} other file(s): {', '.join(skipped[:3])}{', …' if len(skipped) > 3 else ''}"
        if not files:
            raise DataError(f"directory {path} contains no .txt, .jsonl or .parquet files{f' ({listed})' if skipped else ''} "
                            "outside hidden files and folders (names starting with '.', which are skipped); add data "
                            "files or point --data at a file")
        if skipped:  # a .csv or .json among the data would otherwise just be missing from it
            warnings.warn(f"{path}: read {len(files)} data file(s) and skipped {listed}, of no format poetlm reads; data "
                          "files are .txt, .jsonl or .parquet (.txt/.jsonl optionally .xz/.gz)", stacklevel=2)
        for file in files:
            yield from _iter_file(file)
    else:
        yield from _iter_file(path)


def _iter_file(path: Path) -> Iterator[str]:
    fmt = _format_of(path)
    if fmt is None:
        raise DataError(
            f"unsupported file type {path.name!r}; use .txt (blank-line separated documents), "
            ".jsonl (one {\"text\": ...} object per line) or .parquet (a \"text\" column), "
            "optionally .xz/.gz compressed (not parquet)"
        )
    try:
        if fmt == ".txt":
            yield from _iter_txt(path)
        elif fmt == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            yield from _iter_parquet(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 text ({e.reason}); re-encode it as UTF-8") from e
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read {path}: {e}; check that the file is complete and readable") from e


def _open_text(path: Path):
    opener = _COMPRESSIONS.get(path.suffix.lower(), open)
    # utf-8-sig: editors on Windows like to prepend a BOM that would otherwise leak into the text.
    return opener(path, "rt", encoding="utf-8-sig")


def _iter_txt(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines).strip()
                lines = []
        if lines:
            yield "\n".join(lines).strip()


def _text_field(record, where: str) -> str | None:
    """The document in a json/hf record, or None when it is empty."""
    if not isinstance(record, dict) or "text" not in record:
        found = f"found fields {sorted(record)}" if isinstance(record, dict) else "not a JSON object"
        raise DataError(
            f'{where}: no "text" field ({found}); every record needs a "text" field holding the document'
        )
    text = record["text"]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f'{where}: "text" is a {type(text).__name__}, not a string; store the document as a string'
        )
    if text and _SURROGATE.search(text):
        raise DataError(
            f'{where}: "text" contains an unpaired surrogate (an escape such as \\ud800 that JSON allows but that is '
            "no character, so it cannot be encoded as UTF-8 text); clean that record"
        )
    return text if text and text.strip() else None


def _iter_jsonl(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {lineno}: invalid JSON ({e.msg}); fix or remove that line"
                ) from e
            text = _text_field(record, f"{path}, line {lineno}")
            if text is not None:
                yield text


def _iter_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow; {_INSTALL_DATA}") from e
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if "text" not in names:
            raise DataError(
                f'{path}: no "text" column (found {names}); store the documents in a column named "text"'
            )
        row = 0
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                text = _text_field({"text": text}, f"{path}, row {row}")  # a binary or int column is refused, as in .jsonl
                if text is not None:
                    yield text
    except pyarrow.ArrowException as e:
        raise DataError(f"{path} is not a readable parquet file ({e}); re-export it") from e


def split_hf_spec(spec: str) -> tuple[str, str | None]:
    """(NAME, CONFIG) of hf:NAME[:CONFIG], a leading ~ expanded: datasets would look for a directory named "~"."""
    # A local directory may itself contain ':'; only split when it is not one.
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser()), None
    name, _, config = spec.partition(":")
    return str(Path(name).expanduser()) if name.startswith("~") else name, config or None


def _iter_hf(spec: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{spec} needs the `datasets` package; {_INSTALL_DATA}") from e
    name, config = split_hf_spec(spec)
    if not name:
        raise DataError("hf: needs a dataset name, e.g. hf:allenai/c4:en")
    honor_offline_env()

    def unreachable(e: Exception) -> DataError:
        if Path(name).is_dir():  # no Hub involved: the directory's files are what datasets could not read
            return DataError(f"datasets cannot read the directory hf:{spec} ({type(e).__name__}: {e}); fix its files, "
                             "or use --data PATH, which reads .txt/.jsonl/.parquet files and directories of them")
        return DataError(
            f"cannot load Hugging Face dataset hf:{spec} ({type(e).__name__}: {e}); it does not exist "
            "or the Hub is unreachable (no network is available by default). Use --data PATH with "
            "local .txt/.jsonl/.parquet files or a directory of them (a downloaded copy of the dataset)"
        )

    try:
        builder = datasets.load_dataset_builder(name, config)  # what load_dataset builds, before it picks the split
    except Exception as e:  # datasets raises many unrelated types for "not there"
        raise unreachable(e) from e
    splits = [str(split) for split in builder.config.data_files or {}]  # None: the dataset's own script chooses
    if splits and "train" not in splits:
        raise DataError(f"hf:{spec} has no train split (found: {', '.join(splits)}): poetlm trains on a dataset's train "
                        "split and holds out its own validation from it; name the training files train.* (or pass "
                        "them with --data PATH)")
    try:
        examples = iter(builder.as_streaming_dataset(split="train"))
    except StopIteration:  # a format builder found no record to read the columns from: the split is empty
        return
    except Exception as e:
        raise unreachable(e) from e
    for i in itertools.count():
        try:
            example = next(examples)
        except StopIteration:
            return
        except Exception as e:  # streaming fetches lazily, so network errors surface here too
            raise unreachable(e) from e
        text = _text_field(example, f"hf:{spec}, example {i}")
        if text is not None:
            yield text


# ---------------------------------------------------------------------------------------
# Splitting


_SPACE = re.compile(r"\s")
MIN_CUT_CHARS = 256  # no cut inside a line into passages shorter than this (a sentence, a few words: a tiny corpus)


def _passages(text: str, size: int, within_lines: bool = False) -> list[str]:
    """`text` cut after the first line end past every `size` characters. `within_lines`: where no line end
    comes within another `size` (one long line: a text8-style corpus, records exported without line ends),
    after the first whitespace past it instead, or at `size` itself in text without spaces, so no passage
    is much longer than 2·size (only where `size` is at least MIN_CUT_CHARS)."""
    passages, start = [], 0
    cut_lines = within_lines and size >= MIN_CUT_CHARS
    while start < len(text):
        cut = start + size
        end = text.find("\n", cut, cut + size) if cut_lines else text.find("\n", cut)
        if end < 0 and cut_lines and cut + size < len(text):
            space = _SPACE.search(text, cut, cut + size)
            end = space.start() if space else cut - 1
        end = len(text) if end < 0 else end + 1
        if text[start:end].strip():
            passages.append(text[start:end].strip())
        start = end
    return passages


def _unit_hash(seed: int, index: int) -> float:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


PASSAGE_CHARS = 20_000  # the longest passage a document is cut into when it is too large a share of the corpus


def _held_out_by_share(units: list[str], val_fraction: float, scores: list[float]) -> list[bool]:
    """Units in hash order until they hold `val_fraction` of the characters. One that would take the held-out
    text past twice that is passed over: a passage that no line end could cut (one long line) is that large."""
    target = val_fraction * sum(map(len, units))
    in_val, held = [False] * len(units), 0
    for i in sorted(range(len(units)), key=scores.__getitem__):
        if held >= target:
            break
        if held + len(units[i]) <= 2 * target:
            in_val[i] = True
            held += len(units[i])
    return in_val


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, val), deterministically from ``seed``.

    Membership depends only on (seed, index), so it is stable across runs and machines: a document is held out
    when its hash falls below ``val_fraction``. Both splits get at least one document. That holds out about
    ``val_fraction`` of the text only while every document is a small share of it. A corpus with a document
    longer than ``val_fraction`` of its text (a book, perhaps after a title; a text with one sentence or verse
    per line and no blank lines; a few long documents) is instead cut at line ends into passages of at most
    ``PASSAGE_CHARS`` characters and half the held-out share, split by their hashes alike. Where that holds out
    less than half or more than twice ``val_fraction`` of the text (few passages: a small text), validation
    instead takes passages in hash order until it holds ``val_fraction``: split whole, the validation set could
    be the title alone, or most of the corpus. Large books (web, kjv) keep the membership by hash they always had.
    Only where line ends cannot give that share (lines longer than the passages: a one-line corpus, records
    without line ends) are long lines cut at whitespace too (`_passages(within_lines=True)`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    total = sum(map(len, docs))
    if not (docs and max(map(len, docs)) > val_fraction * total):
        units, in_val = docs, _membership(docs, val_fraction, seed, by_share=False)
    else:
        size = min(PASSAGE_CHARS, int(val_fraction * total / 2))
        for within_lines in (False, True):
            units = [passage for doc in docs for passage in _passages(doc, size, within_lines)]
            in_val = _membership(units, val_fraction, seed, by_share=True)
            if len(units) >= 2 and _near_share(units, in_val, val_fraction):
                break
    if len(units) < 2:
        raise DataError(
            f"the corpus is one document of {len(units[0]) if units else 0} characters, too short to cut into a "
            "training and a validation part; use a larger corpus or a larger data.val_fraction"
        )
    train = [d for d, v in zip(units, in_val) if not v]
    val = [d for d, v in zip(units, in_val) if v]
    return train, val


def _near_share(units: list[str], in_val: list[bool], val_fraction: float) -> bool:
    """Whether the held-out units hold between half and twice val_fraction of the characters."""
    held = sum(len(unit) for unit, v in zip(units, in_val) if v) / max(1, sum(map(len, units)))
    return 0.5 * val_fraction <= held <= 2 * val_fraction


def _membership(units: list[str], val_fraction: float, seed: int, by_share: bool) -> list[bool]:
    """Which units are held out: by hash, or (`by_share`, where the hashes miss val_fraction by 2×) in hash
    order by share; never all, never none (of at least two units)."""
    scores = [_unit_hash(seed, i) for i in range(len(units))]
    in_val = [s < val_fraction for s in scores]
    if by_share and units:
        if not _near_share(units, in_val, val_fraction):
            in_val = _held_out_by_share(units, val_fraction, scores)
    if len(units) >= 2 and not any(in_val):
        in_val[min(range(len(units)), key=scores.__getitem__)] = True
    if len(units) >= 2 and all(in_val):
        in_val[max(range(len(units)), key=scores.__getitem__)] = False
    return in_val


# ---------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE on ``docs`` and save it to ``out_dir`` (AutoTokenizer-loadable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise DataError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
            f"{len(alphabet) + 1} (256 bytes + {EOS_TOKEN}); use a larger vocab_size"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,  # every byte stays encodable, even ones absent from docs
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer, length=len(docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        # decode() must give back exactly the text that was encoded
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face Hub id (NAME or ORG/NAME), not as a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


# What to do about a tokenizer that cannot be loaded, by where it comes from (load_tokenizer's `hint`).
CHOOSE_TOKENIZER = "pass a directory written by save_pretrained (e.g. from an earlier run), or omit --tokenizer to train one"
RUN_TOKENIZER = "it is the run's own tokenizer: restore it from a backup of the run directory, or start a new run"
MODEL_TOKENIZER = ("a model directory holds its tokenizer beside the weights: restore the tokenizer files from a copy "
                   "of the directory, or export the model again (poetlm export RUN_DIR DIR)")

# Any usable tokenizer encodes it to some tokens; numbers, punctuation, accents, symbols and whitespace are where
# pre-tokenizers differ (digits split one by one, NFC, …).
PROBE_TEXT = "In 1790, the 3rd of 12,345 «cafés» ☃ naïve!? \n\tend"
# A directory saved with a tokenizer holds one of these (save_pretrained always writes tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | Path, hint: str = CHOOSE_TOKENIZER) -> "PreTrainedTokenizerFast":
    """Load a Hugging Face tokenizer: a local directory, or a hub id (needs network). It must define an eos
    token (used to separate documents) and encode text to tokens. `hint`: what the user can do when a
    directory cannot be loaded."""
    name, path = str(path), Path(path).expanduser()
    from transformers import AutoTokenizer

    if not path.is_dir():
        if path.exists() or not is_hub_id(name):
            raise DataError(f"{path} is a file, not a tokenizer directory; {hint}" if path.exists() else
                            f"tokenizer directory {path} does not exist; {hint}")
        honor_offline_env()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # transformers raises assorted types
            raise DataError(f"{name!r} is not a local directory, and the Hugging Face Hub could not provide a tokenizer "
                            f"for it ({type(e).__name__}: {e}); offline, pass a local directory") from None
    else:
        # Without tokenizer files transformers still builds one (from config.json) that encodes every text to nothing.
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            raise DataError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); {hint}")
        try:
            tokenizer = _saved_class(path).from_pretrained(str(path))
        except Exception as e:  # transformers raises assorted types for a broken directory
            problem = " ".join(str(e).split())  # transformers' explanations span lines
            raise DataError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {problem}); {hint}") from e
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {path} has no eos token, which is needed to separate documents: "
            f"set eos_token in its tokenizer_config.json; {hint}"
        )
    if not tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise DataError(f"tokenizer {path} encodes text to no tokens (its vocabulary is empty or damaged); {hint}")
    return tokenizer


# tokenizer_config.json's class for a tokenizer that is its tokenizer.json alone (poetlm's BPE, as transformers 5 / 4 save it)
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_class(directory: Path):
    """The class that loads `directory`'s tokenizer as saved: AutoTokenizer, except for a generic tokenizer.json
    beside a config.json whose model type has a tokenizer class of its own (qwen2), which AutoTokenizer would
    take instead, with other pre-tokenization (`warn_if_reloaded_otherwise`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        saved = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # missing or damaged: AutoTokenizer's own error says it best
        saved = None
    generic = saved in GENERIC_TOKENIZER_CLASSES and (directory / "tokenizer.json").is_file()
    return PreTrainedTokenizerFast if generic else AutoTokenizer


def warn_if_reloaded_otherwise(directory: Path, tokenizer) -> None:
    """Warn when `AutoTokenizer.from_pretrained(directory)` (a model directory just written) encodes text
    otherwise than `tokenizer`. transformers 5 picks the tokenizer class of some model types (qwen2) from
    config.json's model_type whatever tokenizer_config.json says, and that class builds its own
    pre-tokenization around the saved vocabulary: other token ids than the model was trained on (poetlm's own
    commands read the directory as saved: `_saved_class`)."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(directory))
    ours = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    theirs = reloaded(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if theirs != ours:
        print(f"poetlm: warning: transformers.AutoTokenizer.from_pretrained({str(directory)!r}) loads a "
              f"{type(reloaded).__name__}, which encodes text into other tokens than the model was trained on "
              f"({len(theirs)} tokens where it had {len(ours)} for {PROBE_TEXT!r}); load its tokenizer with "
              "transformers.PreTrainedTokenizerFast.from_pretrained, which keeps tokenizer.json as saved", file=sys.stderr)


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:  # slow tokenizers have no JSON form; the vocabulary is the next best identity
        content = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    content += f"\neos={tokenizer.eos_token_id}\nlen={len(tokenizer)}"
    return hashlib.sha256(content.encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Token cache


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer: "PreTrainedTokenizerFast"
    eos_id: int
    cache_dir: Path
    identity: dict = field(default_factory=dict)  # the source's identity when it was read (see _data_identity)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def record(self) -> dict:
        """What finds exactly these tokens again; a run keeps it as run_dir/data.json (see load_run_data)."""
        meta = json.loads((self.cache_dir / "meta.json").read_text())
        return {"identity": self.identity, "cache_dir": str(self.cache_dir), "tokenizer_hash": meta["tokenizer_hash"],
                "sha256_train": meta["sha256_train"], "sha256_val": meta["sha256_val"]}


def _data_identity(data: str) -> dict:
    """What the cache keys depend on: changes to the underlying files invalidate caches."""
    if data.startswith("hf:"):
        name, _ = split_hf_spec(data[3:])
        local = Path(name).expanduser()
        if local.is_dir():  # datasets reads any file type there, so track them all
            files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
            return {"hf": data[3:], "files": [_file_identity(f) for f in files]}
        return {"hf": data[3:]}
    path = Path(data).expanduser()
    if path.exists():
        files = _data_files(path)[0] if path.is_dir() else [path]
        return {"files": [_file_identity(f) for f in files]}
    if data in BUNDLED_CORPORA:
        return {"bundled": data, "size": _bundled_path(data).stat().st_size}
    return {"unknown": data}  # read_documents will raise the proper error


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _key(**parts) -> str:
    blob = json.dumps({"version": _CACHE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _memmap(path: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _check_cache(cache_dir: Path, tokenizer_hash: str) -> str | None:
    """None if the cache is complete and intact, else why it is not."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        if meta["tokenizer_hash"] != tokenizer_hash:
            return "it was built with a different tokenizer"
        for split in ("train", "val"):
            path = cache_dir / f"{split}.bin"
            expected = int(meta[f"n_{split}"]) * dtype.itemsize
            if path.stat().st_size != expected:
                return f"{path.name} has {path.stat().st_size} bytes, expected {expected}"
            if sha256_file(path) != meta[f"sha256_{split}"]:
                return f"{path.name} checksum mismatch"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _write_tokens(path: Path, docs: list[str], tokenizer, dtype: np.dtype, eos_id: int) -> tuple[int, str]:
    """Append each document's ids plus eos to ``path``; returns (n_tokens, sha256)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "wb") as f:
        for start in range(0, len(docs), _TOKENIZE_BATCH):
            batch = docs[start : start + _TOKENIZE_BATCH]
            # verbose=False: long documents are fine here, we never feed them to a model whole
            # split_special_tokens: a document's literal "<|endoftext|>" (web text has some) stays text, not a
            # document boundary that nobody put there.
            encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            flat: list[int] = []
            for ids in encoded:
                flat.extend(ids)
                flat.append(eos_id)
            chunk = np.asarray(flat, dtype=dtype).tobytes()
            f.write(chunk)
            h.update(chunk)
            n += len(flat)
    return n, h.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place, replacing a stale one."""
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # another process published the same cache first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def _build_dir(final: Path) -> Path:
    """A fresh hidden directory beside `final` to build it in (published by an atomic rename). It is named
    after this host and process, so that the build directories of processes that were killed (the others'
    are in use: builds may run concurrently) are found and removed here instead of piling up."""
    host = socket.gethostname()
    for stale in final.parent.glob(f".{final.name}.{host}.*"):
        pid = stale.name[len(f".{final.name}.{host}."):].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{host}.{os.getpid()}.", dir=final.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _tokenizer_for(
    tokenizer: str | None, cache_root: Path, identity: dict, vocab_size: int, split_key: dict,
    get_train_docs,
):
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    tok_dir = cache_root / "tokenizers" / _key(data=identity, vocab_size=vocab_size, **split_key)
    if tok_dir.is_dir():
        try:
            return load_tokenizer(tok_dir)
        except DataError as e:
            warnings.warn(f"cached tokenizer {tok_dir} is unusable ({e}); retraining it", stacklevel=3)
    train_docs = get_train_docs()
    tok_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _build_dir(tok_dir)
    try:
        train_tokenizer(train_docs, vocab_size, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, tok_dir)
    # Reload from disk so the hash matches what every later run will see.
    return load_tokenizer(tok_dir)


def prepare_data(
    data: str,
    *,
    tokenizer: str | None,
    vocab_size: int,
    cache_root: Path,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    max_documents: int | None = None,
    documents_option: str = "data.max_documents={}",
) -> TokenData:
    """Read, split, tokenize and cache ``data``; returns memory-mapped train/val token ids.

    The tokenizer (when trained here) and the token arrays are cached under ``cache_root`` and
    reused by later calls with the same inputs. A cache that fails validation (unparsable
    meta.json, wrong size, checksum mismatch, or a tokenizer_hash that differs from the
    tokenizer in use) is rebuilt with a warning. `documents_option`: see read_documents.
    """
    cache_root = Path(cache_root).expanduser()
    identity = _data_identity(data)
    split_key = {"val_fraction": val_fraction, "split_seed": split_seed, "max_documents": max_documents}
    splits: list[tuple[list[str], list[str]]] = []

    def get_splits() -> tuple[list[str], list[str]]:
        # Read lazily: with a warm cache the corpus (maybe a slow hf: stream) is never touched.
        if not splits:
            docs = read_documents(data, max_documents=max_documents, documents_option=documents_option)
            splits.append(split_documents(docs, val_fraction, split_seed))
        return splits[0]

    tok = _tokenizer_for(tokenizer, cache_root, identity, vocab_size, split_key, lambda: get_splits()[0])
    tok_hash = _tokenizer_hash(tok)
    eos_id = int(tok.eos_token_id)
    cache_dir = cache_root / "tokens" / _key(data=identity, tokenizer_hash=tok_hash, **split_key)

    problem = _check_cache(cache_dir, tok_hash) if cache_dir.exists() else "missing"
    if problem not in (None, "missing"):
        warnings.warn(f"token cache {cache_dir} is invalid ({problem}); rebuilding it", stacklevel=2)
    if problem is not None:
        train_docs, val_docs = get_splits()
        dtype = np.dtype(np.uint16 if len(tok) < 2**16 else np.uint32)
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _build_dir(cache_dir)
        try:
            meta = {"dtype": dtype.name, "tokenizer_hash": tok_hash, "vocab_size": len(tok), "eos_id": eos_id}
            for split, docs in (("train", train_docs), ("val", val_docs)):
                n, digest = _write_tokens(tmp / f"{split}.bin", docs, tok, dtype, eos_id)
                meta[f"n_{split}"] = n
                meta[f"sha256_{split}"] = digest
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, cache_dir)

    return _open_cache(cache_dir, tok, identity)


def _open_cache(cache_dir: Path, tokenizer, identity: dict) -> TokenData:
    meta = json.loads((cache_dir / "meta.json").read_text())
    return TokenData(
        train=_memmap(cache_dir / "train.bin", meta["dtype"], meta["n_train"]),
        val=_memmap(cache_dir / "val.bin", meta["dtype"], meta["n_val"]),
        tokenizer=tokenizer,
        eos_id=int(tokenizer.eos_token_id),
        cache_dir=cache_dir,
        identity=identity,
    )


# What TokenData.record holds: a data.json without all of it of these types is damaged.
_RECORD = {"identity": dict, "cache_dir": str, "tokenizer_hash": str, "sha256_train": str, "sha256_val": str}


def _run_record(run_dir: Path) -> dict:
    """run_dir/data.json, checked: which tokens the run trained on (`TokenData.record`)."""
    path = Path(run_dir) / "data.json"
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or any(not isinstance(record.get(key), kind) for key, kind in _RECORD.items()):
            raise ValueError("not the record TokenData.record writes")
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is missing, unreadable or damaged ({type(e).__name__}: {e}): it records "
                        "which tokens the run trained on, and without it the run cannot go on exactly. Restore the file "
                        "(from a backup of the run directory), or start a new run") from None
    return record


def _how_it_differs(current: dict, identity: dict) -> str:
    """How a source (its `_data_identity`) differs from the one a run recorded in data.json, for messages:
    the same source changed, or another one."""
    def where(found: dict):  # an identity without what changes with the content (sizes, times)
        return [entry[0] for entry in found["files"]] if "files" in found else {k: v for k, v in found.items() if k != "size"}

    now, then = where(current), where(identity)
    # One folder with files added or removed: it holds every recorded file that is still there, and some
    surviving = {path for path in then if Path(path).exists()} if isinstance(then, list) else set()
    if now == then or (isinstance(now, list) and set(now) & set(then) and surviving <= set(now)):
        return "changed since this run started"
    files = identity.get("files")
    recorded = (files[0][0] + (f" and {len(files) - 1} more files" if len(files) > 1 else "") if files else
                str(identity.get("bundled") or identity.get("hf") or identity.get("unknown")))
    if "unknown" in current:  # the run's place for its data (a resume refuses a new one that does not exist), emptied
        return "is no longer there"
    return f"is not the data this run started on ({recorded})"


def check_resume_data(run_dir: Path, recorded: str, new: str) -> None:
    """Refuse a resume's new data location where the run's own data is still there as recorded: the new
    one is then another source (a new location is for data that moved). Its tokens are checked anyway
    (`load_run_data`); this keeps config.json from naming a source the run never trained on."""
    identity = _run_record(run_dir)["identity"]
    if "unknown" in _data_identity(new):  # a typo would be recorded as the data's place, and the run go on from its cache
        raise DataError(f"data.data={new!r} does not exist: give the place the run's data moved to (a file or directory "
                        "that exists), or resume without --data")
    if _data_identity(recorded) == identity and _data_identity(new) != identity:
        raise DataError(f"data.data={new!r} is not this run's data: it trained on {recorded}, which is still there "
                        "unchanged. Resume without --data (a new location is for data that moved), or start a new run "
                        "on the new data")


def load_run_data(run_dir: Path, data: str, **options) -> TokenData:
    """The very tokens a run trained on, with its own tokenizer (run_dir/tokenizer), for resume and eval.

    Its token cache is used while it is intact, even if `data` changed since. Without it `data` is
    tokenized again with the run's tokenizer, and refused if that gives different tokens: a changed
    corpus must never silently change what a resumed run trains on. `options` are prepare_data's.
    """
    run_dir = Path(run_dir)
    record = _run_record(run_dir)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir, hint=RUN_TOKENIZER)
    if _tokenizer_hash(tokenizer) != record["tokenizer_hash"]:
        raise DataError(f"{tokenizer_dir} is not the tokenizer this run was trained with (it was changed); restore it")
    cache_dir = Path(record["cache_dir"])
    sums = {split: record[f"sha256_{split}"] for split in ("train", "val")}
    if cache_dir.is_dir() and _check_cache(cache_dir, record["tokenizer_hash"]) is None:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if all(meta[f"sha256_{split}"] == digest for split, digest in sums.items()):
            current = _data_identity(data)
            if current != record["identity"]:
                print(f"poetlm: note: {data} {_how_it_differs(current, record['identity'])}; its tokens are read "
                      f"from the run's token cache, as the run made them ({cache_dir})", file=sys.stderr)
            return _open_cache(cache_dir, tokenizer, record["identity"])
    current = _data_identity(data)
    if "unknown" in current:  # neither there nor in the cache: prepare_data would only say it is missing
        raise DataError(f"{data} {_how_it_differs(current, record['identity'])}, and the run's token cache {cache_dir} "
                        "is gone or damaged; if the run's data moved, give its new place with --data NEW_PATH")
    tokens = prepare_data(data, tokenizer=str(tokenizer_dir), **options)
    if any(tokens.record()[f"sha256_{split}"] != digest for split, digest in sums.items()):
        raise DataError(f"{data} {_how_it_differs(_data_identity(data), record['identity'])}: it does not give the tokens the run trained on, and "
                        f"the run's token cache {cache_dir} is gone or damaged. Restore the original data to continue this run, "
                        "or start a new run on the new data")
    return tokens


# ---------------------------------------------------------------------------------------
# Batches


def sample_offsets(n_tokens: int, step: int, n_rows: int, seq_len: int, seed: int) -> np.ndarray:
    """Random window starts for optimizer step ``step``; a pure function of its arguments,
    so a resumed run sees exactly the batches it would have seen."""
    if n_tokens < seq_len + 1:
        raise DataError(
            f"training split has {n_tokens} tokens, fewer than seq_len+1={seq_len + 1}; "
            "use a larger corpus or a smaller seq_len"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, n_rows)


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of the randomness (dropout) of micro-batch `index` of optimizer step `step`'s global batch; a pure
    function of its arguments, so each micro-batch draws its own masks wherever it runs: on any rank, on any number
    of processes, in a resumed run."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0])


def make_batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (rows, seq_len) int64."""
    idx = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(seq_len + 1)
    windows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def val_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """Starts of the fixed validation windows: stride seq_len, seq_len+1 tokens each, so every
    token after the first is predicted exactly once; at most ``max_tokens`` predictions."""
    n_windows = (len(tokens) - 1) // seq_len if len(tokens) > 0 else 0
    if n_windows < 1:
        raise DataError(
            f"validation split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}; "
            "use a larger corpus, a smaller seq_len (eval: --seq-len) or, when training, a larger data.val_fraction"
        )
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seq_len)
        if n_windows < 1:
            raise DataError(
                f"the validation token budget {max_tokens} is smaller than seq_len={seq_len}; "
                "raise it (the config's eval_tokens, or poetlm eval --tokens) or lower seq_len"
            )
    return np.arange(n_windows, dtype=np.int64) * seq_len
