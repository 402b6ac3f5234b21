"""Help text of the config, taken from loopmoe/config.py itself: a section's help is its class docstring's
first line, a field's help the ``# comment`` at the end of its line (else the comment lines just above it),
as the simple_parsing library does. One source: a field documented in config.py is documented in --help
and --print-config (tests/test_config_help.py requires every field to have one).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize

import yaml

from loopmoe import config as config_module
from loopmoe.config import Config


@functools.lru_cache(maxsize=1)
def _all_field_help() -> dict[str, dict[str, str]]:
    """{class name: {field: help}} for every dataclass in loopmoe/config.py (parsed once)."""
    src = inspect.getsource(config_module)
    trailing: dict[int, str] = {}  # line -> comment after code on that line
    own_line: dict[int, str] = {}  # line -> a comment alone on its line
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.start[0] in code_lines else own_line)[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            code_lines.add(tok.start[0])
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(src).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                line = stmt.lineno
                text = trailing.get(stmt.end_lineno or line, "")
                if not text:  # the comment block right above the field
                    above, ln = [], line - 1
                    while ln in own_line:
                        above.insert(0, own_line[ln])
                        ln -= 1
                    text = " ".join(above)
                fields[stmt.target.id] = text
        out[node.name] = fields
    return out


def field_help(cls: type) -> dict[str, str]:
    """{field name: its help} for one section class ("" where config.py has no comment)."""
    known = _all_field_help().get(cls.__name__, {})
    return {f.name: known.get(f.name, "") for f in dataclasses.fields(cls)}


def section_help(cls: type) -> str:
    """The first line of the section's docstring ("" when it has none)."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not a description
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def sections(cfg: Config | None = None):
    """(section name, section object) of a config (defaults when None)."""
    cfg = cfg or Config()
    return [(sec.name, getattr(cfg, sec.name)) for sec in dataclasses.fields(Config)]


def describe_fields() -> str:
    """Text for --help: every section with its description, every field with its default and meaning."""
    lines = []
    for name, sub in sections():
        lines.append(f"{name}:  {section_help(type(sub))}")
        helps = field_help(type(sub))
        for f in dataclasses.fields(sub):
            lines.append(f"  {name}.{f.name} = {getattr(sub, f.name)!r}  # {helps[f.name]}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def commented_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each section and field with its help as a comment (loads back equal:
    ``yaml.safe_load(commented_yaml(cfg)) == to_dict(cfg)``)."""
    lines = []
    for name, sub in sections(cfg):
        lines.append(f"{name}:  # {section_help(type(sub))}")
        helps = field_help(type(sub))
        for f in dataclasses.fields(sub):
            lines.append(f"  {f.name}: {_yaml_value(getattr(sub, f.name))}  # {helps[f.name]}")
    return "\n".join(lines) + "\n"
