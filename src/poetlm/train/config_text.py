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

from .config import METHODS, TrainConfig, config_value, load_toml, methods_using, resolve_config

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


def describe_config(preset: str = "tiny", method: str | None = None) -> str:
    """Every config key with its value under `preset` and `method` (by default what plain `poetlm train` runs) and
    its description: what `poetlm config` prints."""
    placeholder = _needs_base_model(preset, method)
    config = resolve_config(preset, [*([("method", method)] if method else []), *placeholder])
    rows = config_keys(config)
    width = max(len(key) for key, _, _ in rows)
    shown = {key: "null" if value is None else toml_value(value) for key, value, _ in rows}
    value_width = min(20, max(map(len, shown.values())))
    sections = field_descriptions(TrainConfig)
    # A finetuning method runs only from `poetlm finetune`, which names the base model.
    verb = f"finetune --model {BASE_MODEL_PLACEHOLDER} --data DATA" if placeholder else "train"
    command = f"poetlm {verb}{'' if preset == 'tiny' else ' --config ' + preset}{' --method ' + method if method else ''}"
    lines = [f"Config keys, their values in preset {preset!r} with method {config.method!r} (what `{command}` runs; "
             "`poetlm config --config NAME --method M` shows another) and what they do.",
             "[M]: only method(s) M read the key (a run of another method that sets it warns).",
             "Set keys in a TOML file (--config FILE; `poetlm train --print-config` writes one) or as KEY=VALUE arguments, "
             "e.g. optim.lr=3e-3.",
             f"Two more keys name things rather than set them: name_prefix (runs are named NAME_PREFIX-METHOD unless name "
             f"is set; here {config.resolution.name_prefix!r}) and, in a file only, base (the preset or file it builds on)."]
    if placeholder:
        lines.append(f"finetune.base_model {BASE_MODEL_PLACEHOLDER!r} stands for the model lora finetunes "
                     "(poetlm finetune --model MODEL sets it).")
    section = ""
    for key, _, text in rows:
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            lines.append(f"\n[{head}]  {_users(head + '.')}{sections.get(head, '')}")
        tag = _users(key) if methods_using(key) != methods_using(head + ".") else ""
        lines.append(f"  {key:<{width}}  {shown[key]:<{value_width}}  {tag}{text}")
    return "\n".join(lines) + "\n"


# lora only finetunes (a run without finetune.base_model is refused); its listing shows this in its place.
BASE_MODEL_PLACEHOLDER = "MODEL"


def _needs_base_model(preset: str, method: str | None) -> list[tuple[str, str]]:
    """The override that lets `poetlm config` list a lora config whose base model only `finetune --model` would set."""
    values = load_toml(preset)
    if (method or values.get("method")) != "lora" or values.get("finetune", {}).get("base_model") is not None:
        return []
    return [("finetune.base_model", BASE_MODEL_PLACEHOLDER)]


def _users(key: str) -> str:
    """'[poet-paper] ' for a key (or section, 'poet.') that only some methods read, else ''."""
    users = methods_using(key)
    return "" if users == METHODS else f"[{', '.join(users)}] "


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
    its default, which is None for every key that can be None. A config from `resolve_config` keeps what it
    derived derived: the name, poet.seed and the method's own defaults are written as comments and the
    preset's [methods.NAME] tables as tables, so that the file with more overrides (--seed, --method) resolves
    as the preset would.
    """
    resolution = getattr(config, "resolution", None)  # None: a run's saved config.json, every value as it ran
    derived = resolution.derived if resolution else {}
    lines = ["# poetlm train config, resolved (poetlm train --config THIS_FILE runs it); a [methods.NAME] table at the end",
             "# sets its keys for that method, over the values above"]
    if "name" in derived:
        lines.append(f"name_prefix = {toml_value(resolution.name_prefix)}  # runs are named NAME_PREFIX-METHOD unless name is set")
    # The keys this config's method takes from its own table: an edit above would not reach its run.
    overridden = _flat((resolution.methods if resolution else {}).get(config.method, {}))
    section = ""
    for key, value, _ in config_keys(resolution.top if resolution else config):
        head, _, name = key.rpartition(".")
        if head != section:
            section = head
            lines.append(f"\n[{head}]")
        if key in derived:
            line = f"# {name} = {toml_value(config_value(config, key))}  ({derived[key]})"
        else:
            line = f"# {name} is unset (null)" if value is None else f"{name} = {toml_value(value)}"
        if key in overridden:
            line += (f"  # method {config.method} uses {toml_value(overridden[key])}, from [methods.{config.method}"
                     f"{'.' + head if head else ''}] below: edit it there")
        lines.append(line)
    for method, table in (resolution.methods if resolution else {}).items():
        lines += _table_lines(f"methods.{method}", table)
    return "\n".join(lines) + "\n"


def _flat(table: dict, prefix: str = "") -> dict:
    """A nested table as {dotted key: value}."""
    flat = {}
    for key, value in table.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _table_lines(head: str, table: dict) -> list[str]:
    """A TOML table and its subtables, as read (the [methods.NAME] tables of a preset)."""
    values = [f"{key} = {toml_value(value)}" for key, value in table.items() if not isinstance(value, dict)]
    lines = [f"\n[{head}]", *values] if values else []
    for key, value in table.items():
        if isinstance(value, dict):
            lines += _table_lines(f"{head}.{key}", value)
    return lines
