"""The training config as text: TOML that reads back as the same config, and every key with its description.

Each description is written once, where the field is defined: the trailing comment of a field of the
dataclasses in train/config.py, or the `name: description` table in the docstring of POETConfig and
RuleConfig (public classes, documented for `help()`). Both are read from there, so `poetlm config` cannot
drift from the definitions, and a test requires a description for every field.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import tokenize

from .config import TrainConfig

# A docstring table entry: "name: text" or "name, other: text" at the start of a line.
_ENTRY = re.compile(r"(\w+(?:, \w+)*): (.*)")
# The end of a first sentence: a period before a space or the end, not the one of "e.g." or "i.e.".
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.(?=\s|$)")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _first_sentence(text: str) -> str:
    match = _SENTENCE_END.search(text)
    return text[: match.start()] if match else text


def _comment_descriptions(cls) -> dict[str, str]:
    """Field name -> the comment that ends the field's line in the class body."""
    source = inspect.getsource(cls)
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {node.target.id: comments[node.end_lineno] for node in body
            if isinstance(node, ast.AnnAssign) and node.end_lineno in comments}


def _docstring_descriptions(cls) -> dict[str, str]:
    """Field name -> its entry in the class docstring's table (continuation lines are indented)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    entries: dict[str, list[str]] = {}
    current = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _ENTRY.fullmatch(line)
        if match and set(match[1].split(", ")) <= fields:
            current = [match[2]]
            entries.update(dict.fromkeys(match[1].split(", "), current))
        elif current is not None and line.startswith(" "):
            current.append(line.strip())
        else:
            current = None
    return {name: " ".join(parts) for name, parts in entries.items()}


@functools.cache
def field_descriptions(cls) -> dict[str, str]:
    """One line per field of the config dataclass `cls` (fields without a description are missing)."""
    found = {**_docstring_descriptions(cls), **_comment_descriptions(cls)}
    return {name: _first_sentence(text) for name, text in found.items()}


def config_keys(config: TrainConfig | None = None) -> list[tuple[str, object, str]]:
    """(dotted key, value, description) for every key of `config` (default: TrainConfig()), sections' keys after the top level."""
    config = config if config is not None else TrainConfig()
    top, nested = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            nested += [(f"{f.name}.{key}", v, text) for key, v, text in config_keys(value)]
        else:
            top.append((f.name, value, field_descriptions(type(config)).get(f.name, "")))
    return top + nested


def describe_config() -> str:
    """Every config key with its default and description: what `poetlm config` prints."""
    default = TrainConfig()
    rows = config_keys(default)
    width = max(len(key) for key, _, _ in rows)
    shown = {key: "null" if value is None else toml_value(value) for key, value, _ in rows}
    value_width = min(20, max(map(len, shown.values())))
    sections = field_descriptions(TrainConfig)
    lines = ["Config keys, their defaults and what they do. Set them in a TOML file (--config FILE; "
             "`poetlm train --print-config` writes one) or as KEY=VALUE arguments, e.g. optim.lr=3e-3."]
    section = ""
    for key, _, text in rows:
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            lines.append(f"\n[{head}]  {sections.get(head, '')}")
        lines.append(f"  {key:<{width}}  {shown[key]:<{value_width}}  {text}")
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # the shortest exact form; inf and nan are spelled as TOML spells them
    if isinstance(value, str):
        # TOML basic strings: quote, backslash and control characters escaped, everything else as is.
        return '"' + "".join(_ESCAPES.get(c, c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}") for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    raise TypeError(f"no TOML form for {value!r} ({type(value).__name__})")


def to_toml(config: TrainConfig) -> str:
    """`config` as a TOML file that `--config FILE` reads back as an equal config.

    TOML has no null: an unset (None) key is written as a comment, and reading the file back leaves it at
    its default, which is None for every key that can be None.
    """
    lines = ["# poetlm train config, resolved (poetlm train --config THIS_FILE runs it)"]
    section = ""
    for key, value, _ in config_keys(config):
        head, _, name = key.rpartition(".")
        if head != section:
            section = head
            lines.append(f"\n[{head}]")
        lines.append(f"# {name} is unset (null)" if value is None else f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
