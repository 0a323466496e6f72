"""The documentation site, and the reference pages that cannot drift from the code.

    python -m pcam_pipeline.review.site reference   # write docs/reference/{params,cli}.md
    python -m pcam_pipeline.review.site check       # fail (naming the page) when one is stale
    python -m pcam_pipeline.review.site build       # reference pages, build/site-src, mkdocs

The params page is generated from the pydantic models of params.py (every key, its type and what
is allowed), params.yaml (the committed value and the comment on its line) and dvc.yaml (the
stages that changing the key re-runs); the CLI page from `pcam`'s argparse parser. Both are
committed, so GitHub renders them too, and `check` (a test, and `make docs-check`) fails when the
code moved and they did not. The site is README.md (its home page) plus docs/, assembled into
build/site-src with the links between them rewritten, and built by mkdocs-material with --strict:
a broken link or anchor fails the build. Nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

REFERENCE_DIR = Path("docs/reference")
PARAMS_PAGE = REFERENCE_DIR / "params.md"
CLI_PAGE = REFERENCE_DIR / "cli.md"
MKDOCS_CONFIG = Path("mkdocs.yml")
SITE_SRC = Path("build/site-src")  # mkdocs.yml's docs_dir
SITE_DIR = Path("build/site")  # mkdocs.yml's site_dir
HOME_PAGE = "README.md"  # becomes the site's index.md
DOCS_DIR = Path("docs")
PARAMS_YAML = Path("params.yaml")
DVC_YAML = Path("dvc.yaml")
FIX = "make docs-reference"
# Where a page came from, for the note at the top of each generated page.
PARAMS_SOURCES = "params.yaml, src/pcam_pipeline/params.py and dvc.yaml"
CLI_SOURCES = "src/pcam_pipeline/cli.py (`build_parser()`)"


# --- params.yaml: each key's text and the comment on its line ------------------------------------


@dataclass(frozen=True)
class YamlKey:
    """One key of params.yaml as written: its value's text (empty for a section) and comment."""

    value: str
    comment: str


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
_COMMENT_LINE = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """`value  # comment` -> ("value", "comment"): a # outside quotes after a space starts it."""
    quote = ""
    for i, char in enumerate(rest):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def yaml_keys(text: str) -> tuple[str, dict[str, YamlKey]]:
    """params.yaml's leading comment, and every key's dotted path -> its text and comment.

    A comment-only line indented past the key above it continues that key's comment (as
    params.yaml aligns them); comment lines at a key's own indent, just above it, describe it.
    """
    header: list[str] = []
    keys: dict[str, YamlKey] = {}
    stack: list[tuple[int, str]] = []
    last: tuple[str, int] | None = None  # the key a following comment line may continue
    above: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            last, above = None, []
            continue
        comment = _COMMENT_LINE.match(line)
        if comment:
            words = comment["text"].strip()
            if not keys and not stack:
                header.append(words)
            elif last is not None and len(comment["indent"]) > last[1]:
                path, _ = last
                keys[path] = YamlKey(keys[path].value, _join([keys[path].comment, words]))
            else:
                above.append(words)
            continue
        match = _KEY_LINE.match(line)
        if not match:  # a block list item or a continued flow value: nothing to describe
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        path = ".".join(name for _, name in stack)
        value, trailing = _split_comment(match["rest"])
        keys[path] = YamlKey(value, _join([*above, trailing]))
        last, above = (path, indent), []
    return " ".join(header), keys


# --- params.py: the model's fields, their types, bounds and comments -----------------------------


@dataclass(frozen=True)
class ParamField:
    """One key of the params model: a leaf, or a section (a nested model)."""

    path: str
    annotation: Any
    info: FieldInfo
    comment: str  # from params.py: the comment on the field's line or just above it
    section: type[BaseModel] | None


def class_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on its line in the class body, or the comment lines just above."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[str, str] = {}
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    for number, line in enumerate(lines, start=1):
        match = re.match(r"^    (\w+)\s*:", line)
        if not match or match[1] not in model.model_fields:
            continue
        above: list[str] = []
        previous = number - 1
        while previous in by_line and lines[previous - 1].lstrip().startswith("#"):
            above.insert(0, by_line[previous])
            previous -= 1
        trailing = by_line.get(number, "")
        if trailing in ("fmt: skip", "noqa"):
            trailing = ""
        comments[match[1]] = _join([*above, trailing])
    return comments


def _join(lines: Iterable[str]) -> str:
    """Comment lines as one text: a line ending in / continues without a space (Quantize/
    DequantizeLinear)."""
    text = ""
    for line in lines:
        if line:
            text += line if not text or text.endswith("/") else f" {line}"
    return text


def _model_of(annotation: Any) -> type[BaseModel] | None:
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def model_fields(model: type[BaseModel], prefix: str = "") -> Iterator[ParamField]:
    """Every key of the model, depth first, a section before its keys, named as in params.yaml."""
    comments = class_comments(model)
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        section = _model_of(info.annotation)
        yield ParamField(path, info.annotation, info, comments.get(name, ""), section)
        if section is not None:
            yield from model_fields(section, f"{path}.")


def _bounds(metadata: Iterable[Any]) -> list[str]:
    """annotated_types constraints (what Field(ge=..., ...) records) -> readable bounds."""
    lower = upper = ""
    length: list[str] = []
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            lower = f"{item.ge} ≤"
        elif isinstance(item, annotated_types.Gt):
            lower = f"{item.gt} <"
        elif isinstance(item, annotated_types.Le):
            upper = f"≤ {item.le}"
        elif isinstance(item, annotated_types.Lt):
            upper = f"< {item.lt}"
        elif isinstance(item, annotated_types.MinLen):
            length.append(f"length ≥ {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            length.append(f"length ≤ {item.max_length}")
        elif isinstance(item, FieldInfo):
            return _bounds(item.metadata)
    if lower and upper:
        interval = [f"{lower} x {upper}"]
    elif lower:  # "0 <" -> "> 0"
        number, sign = lower.split(" ")
        interval = [f"{'>' if sign == '<' else '≥'} {number}"]
    else:
        interval = [upper] if upper else []
    return interval + length


def _literal(value: Any) -> str:
    return "`null`" if value is None else f"`{str(value).lower() if value is True else value}`"


def describe_type(annotation: Any, metadata: Iterable[Any] = ()) -> tuple[str, str]:
    """(type, allowed values) of a field's annotation, e.g. ("str", "`adamw`, `sgd`")."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    bounds = _bounds(metadata)
    if origin is typing.Annotated:
        return describe_type(args[0], [*args[1:], *metadata])
    if origin is Literal:
        kinds = sorted({type(arg).__name__ for arg in args})
        return " | ".join(kinds), ", ".join(_literal(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(arg) for arg in args]
        type_text = " | ".join(text for text, _ in parts)
        allowed = [text if allowed == "" else allowed for text, allowed in parts]
        allowed = ["`null`" if text == "NoneType" else text for text in allowed]
        return type_text.replace("NoneType", "null"), " or ".join(allowed)
    if origin is list:
        item_type, item_allowed = describe_type(args[0])
        allowed = ", ".join(
            part for part in (item_allowed and f"each {item_allowed}", *bounds) if part
        )
        return f"list[{item_type}]", allowed
    if annotation is bool:
        return "bool", "`true`, `false`"
    name = getattr(annotation, "__name__", str(annotation))
    return name, ", ".join(bounds)


# --- dvc.yaml: which stages a key re-runs --------------------------------------------------------


def stage_params(dvc: Mapping[str, Any]) -> dict[str, list[str]]:
    """Stage -> the params.yaml keys (sections or dotted keys) it declares in dvc.yaml."""
    found: dict[str, list[str]] = {}
    for stage, spec in (dvc.get("stages") or {}).items():
        keys: list[str] = []
        for entry in spec.get("params") or []:
            if isinstance(entry, str):
                keys.append(entry)
            elif isinstance(entry, dict):
                keys.extend(entry.get(str(PARAMS_YAML)) or [])
        found[stage] = keys
    return found


def rerun_by(path: str, stages: Mapping[str, list[str]]) -> list[str]:
    """The stages whose declared params cover the key (or, for a section, any key in it)."""
    return [
        stage
        for stage, keys in stages.items()
        if any(
            path == key or path.startswith(f"{key}.") or key.startswith(f"{path}.") for key in keys
        )
    ]


# --- the params page -----------------------------------------------------------------------------


def _text(text: str) -> str:
    """Plain text (a comment, a help string) as Markdown that shows it as written: outside code
    spans, <tag> is escaped (not HTML) and * is literal."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "".join(parts)


def _cell(text: str) -> str:
    """Text in a Markdown table cell: pipes escaped. In a code span GitHub keeps `\\|` but
    Python-Markdown shows the backslash, so such a span becomes <code> with &#124; (both agree)."""

    def code(match: re.Match[str]) -> str:
        inner = match[1].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return "<code>" + inner.replace("|", "&#124;") + "</code>"

    parts = re.split(r"(`[^`]*\|[^`]*`)", text)
    for i, part in enumerate(parts):
        parts[i] = re.sub(r"^`(.*)`$", code, part) if i % 2 else part.replace("|", "\\|")
    return "".join(parts).strip()


def _description(yaml_comment: str, code_comment: str) -> str:
    if yaml_comment and code_comment and _words(code_comment) != _words(yaml_comment):
        return f"{_text(yaml_comment)}<br>*params.py:* {_text(code_comment)}"
    return _text(yaml_comment or code_comment)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def params_reference(model: type[BaseModel], params_text: str, dvc: Mapping[str, Any]) -> str:
    """Markdown of every key of params.yaml: its type, committed value, what is allowed, the
    stages it re-runs, and its description (the comments of params.yaml and params.py)."""
    header, written = yaml_keys(params_text)
    stages = stage_params(dvc)
    out = [
        f"<!-- Generated from {PARAMS_SOURCES} by `{FIX}`: do not edit by hand. -->",
        "",
        "# Params reference",
        "",
        _text(header),
        "",
        "Every key of `params.yaml`: its type, its committed value, what `params.py` allows (a",
        "value outside it fails before any work starts, naming the key), the stages of `dvc.yaml`",
        "that changing it re-runs, and what it does (the comments of `params.yaml` and",
        f"`params.py`). Generated from {PARAMS_SOURCES}; `{FIX}` rewrites it.",
    ]
    fields = list(model_fields(model))
    unknown = sorted(set(written) - {field.path for field in fields})
    if unknown:
        raise ValueError(f"{PARAMS_YAML} has keys the params model does not: {', '.join(unknown)}")
    for field in fields:
        if "." not in field.path:
            out += ["", f"## {field.path}", ""]
            doc = _docstring(field.section) if field.section is not None else ""
            if doc:
                out += [_text(doc), ""]
            comment = _description(written.get(field.path, YamlKey("", "")).comment, field.comment)
            if comment:
                out += [comment, ""]
            runs = rerun_by(field.path, stages)
            out += [
                f"Re-runs: {', '.join(runs) if runs else 'no stage'}.",
                "",
                "| key | type | value | allowed | re-runs | description |",
                "|---|---|---|---|---|---|",
            ]
            continue
        yaml_key = written.get(field.path)
        value = f"`{yaml_key.value}`" if yaml_key and yaml_key.value else ""
        if field.section is not None:
            kind, allowed = "section", ""
            code = " ".join(part for part in (field.comment, _docstring(field.section)) if part)
        else:
            kind, allowed = describe_type(field.annotation, field.info.metadata)
            code = field.comment
        if yaml_key is None:
            default = field.info.get_default(call_default_factory=False)
            value = "*(absent)*"
            code = " ".join(
                part for part in (code, f"Optional: absent means {_yaml_text(default)}.") if part
            )
        description = _description(yaml_key.comment if yaml_key else "", code)
        runs = ", ".join(rerun_by(field.path, stages))
        row = [f"`{field.path}`", kind, value, allowed, runs, description]
        out.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return "\n".join(line.rstrip() for line in out) + "\n"


def _docstring(model: type[BaseModel]) -> str:
    """The model's own docstring on one line (not pydantic's generated one)."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split())


def _yaml_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1000).strip() + "`"


# --- the CLI page --------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if helps.get(name) != argparse.SUPPRESS:
                    found.append((name, helps.get(name, ""), sub))
    return found


def _metavar(action: argparse.Action) -> str:
    """The value's name as argparse prints it: METAVAR, {a,b} for choices, DEST, dest."""
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(choice) for choice in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


_NARGS = {"?": "[{0}]", "*": "[{0} ...]", "+": "{0} [{0} ...]"}
_NARGS_NOTE = {"?": "(optional)", "*": "(any number)", "+": "(one or more)"}


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    metavar = _metavar(action)
    if action.nargs is None:
        return metavar
    if isinstance(action.nargs, int):
        return " ".join([metavar] * action.nargs)
    return _NARGS.get(str(action.nargs), "...").format(metavar)


def _usage_part(action: argparse.Action) -> str:
    name = action.option_strings[0] if action.option_strings else ""
    text = " ".join(part for part in (name, _value(action)) if part)
    return text if not action.option_strings or action.required else f"[{text}]"


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        and not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
    ]


def _expand(text: str, values: Mapping[str, Any]) -> str:
    """argparse's own expansion of a help string: %(default)s, %(prog)s, 95%% -> 95%."""
    try:
        return text % values
    except (KeyError, TypeError, ValueError):
        return text


def _help(action: argparse.Action, prog: str) -> str:
    return _expand(action.help or "", {**vars(action), "prog": prog})


def _argument_row(action: argparse.Action, prog: str) -> str:
    if action.option_strings:
        value = _metavar(action) if action.nargs != 0 else ""
        names = ", ".join(f"{name} {value}".strip() for name in action.option_strings)
    else:
        names = _metavar(action)
    default = action.default
    shown = ""
    if action.nargs != 0 and default not in (None, argparse.SUPPRESS, []):
        shown = f"`{default}`"
    notes = [_text(_help(action, prog))]
    if action.required and action.option_strings:
        notes.append("(required)")
    if not action.option_strings:
        notes.append(_NARGS_NOTE.get(str(action.nargs), ""))
    if isinstance(action, argparse._AppendAction):
        notes.append("(repeatable)")
    choices = ", ".join(f"`{choice}`" for choice in action.choices or [])
    row = [f"`{names}`", shown, choices, " ".join(note for note in notes if note)]
    return "| " + " | ".join(_cell(cell) for cell in row) + " |"


def _usage(parser: argparse.ArgumentParser) -> str:
    parts = [parser.prog]
    for action in _visible(parser):
        if action.option_strings:
            parts.append(_usage_part(action))
    for action in _visible(parser):
        if not action.option_strings:
            parts.append(_usage_part(action))
    if _subcommands(parser):
        parts.append("COMMAND")
    return " ".join(parts)


def _walk(
    parser: argparse.ArgumentParser, summary: str
) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    yield parser, summary
    for _, help_text, sub in _subcommands(parser):
        yield from _walk(sub, help_text)


def _anchor(prog: str) -> str:
    """The id mkdocs gives the heading `prog`: Python-Markdown's own slugify (underscores kept)."""
    from markdown.extensions.toc import slugify

    return slugify(prog, "-")


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown of `pcam` and every sub-command: usage, arguments, options, defaults and help,
    walked from the parser itself (argparse's SUPPRESSed arguments are left out)."""
    out = [
        f"<!-- Generated from {CLI_SOURCES} by `{FIX}`: do not edit by hand. -->",
        "",
        "# CLI reference",
        "",
        _text(" ".join((parser.description or "").split())),
        "",
        f"Every `{parser.prog}` command, walked from the argument parser; `{FIX}` rewrites this",
        f"page. `{parser.prog} COMMAND --help` prints the same.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    commands = list(_walk(parser, ""))
    for sub, summary in commands[1:]:
        link = f"[`{sub.prog}`](#{_anchor(sub.prog)})"
        out.append(f"| {link} | {_cell(_text(_expand(summary, {'prog': sub.prog})))} |")
    for sub, summary in commands:
        out += ["", f"## {sub.prog}", ""]
        if summary:
            out += [_text(_expand(summary, {"prog": sub.prog})), ""]
        out += ["```", _usage(sub), "```"]
        actions = _visible(sub)
        if actions:
            out += [
                "",
                "| argument | default | choices | help |",
                "|---|---|---|---|",
                *(_argument_row(action, sub.prog) for action in actions),
            ]
        children = _subcommands(sub)
        if children:
            names = ", ".join(f"[`{name}`](#{_anchor(child.prog)})" for name, _, child in children)
            out += ["", f"Commands: {names}."]
    return "\n".join(line.rstrip() for line in out) + "\n"


# --- the pages, generated and committed ----------------------------------------------------------


def reference_pages(
    root: Path,
    model: type[BaseModel] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> dict[Path, str]:
    """docs/reference's pages as the code and the files under root give them now."""
    if model is None:
        from pcam_pipeline.params import Params

        model = Params
    if parser is None:
        from pcam_pipeline.cli import build_parser

        parser = build_parser()
    dvc = yaml.safe_load((root / DVC_YAML).read_text())
    return {
        PARAMS_PAGE: params_reference(model, (root / PARAMS_YAML).read_text(), dvc),
        CLI_PAGE: cli_reference(parser),
    }


def stale_pages(root: Path, pages: Mapping[Path, str]) -> list[str]:
    """One message per committed page that differs from what the code gives (empty: all fresh)."""
    messages = []
    for relative, text in pages.items():
        path = root / relative
        current = path.read_text() if path.exists() else None
        if current != text:
            state = "is missing" if current is None else "is stale"
            messages.append(
                f"{relative} {state}: the code gives a different page. Run `{FIX}` and commit it."
            )
    return messages


def write_pages(root: Path, pages: Mapping[Path, str]) -> list[Path]:
    """Write the pages that changed; return those written."""
    written = []
    for relative, text in pages.items():
        path = root / relative
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(relative)
    return written


# --- the site: README + docs/ into build/site-src, links rewritten -------------------------------

_LINK = re.compile(r"(?<!!)\[(?P<text>(?:[^\[\]]|\[[^\]]*\])*)\]\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def site_pages(sources: Iterable[str]) -> dict[str, str]:
    """Repository path -> its path in the site: README.md is the home page, docs/X is X."""
    mapping = {}
    for source in sources:
        if source == HOME_PAGE:
            mapping[source] = "index.md"
        elif source.startswith(f"{DOCS_DIR.as_posix()}/"):
            mapping[source] = source.removeprefix(f"{DOCS_DIR.as_posix()}/")
    return mapping


def rewrite_links(
    text: str,
    page: str,
    pages: Mapping[str, str],
    exists: Callable[[str], bool],
    repo_url: str | None = None,
) -> str:
    """The page's relative links, as the site needs them.

    A link to another page of the site points at its place in the site. A link to a file of the
    repository outside the site points at it on repo_url (a GitHub blob/tree URL prefix) or, with
    none, becomes its text. A link to nothing is left for mkdocs --strict to report.
    """

    def replace(match: re.Match[str]) -> str:
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            return match[0]
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page), path))
        fragment = f"#{anchor}" if anchor else ""
        if resolved in pages:
            here = posixpath.dirname(pages[page]) or "."
            return f"[{match['text']}]({posixpath.relpath(pages[resolved], here)}{fragment})"
        if resolved.startswith("..") or not exists(resolved):
            return match[0]
        if repo_url:
            return f"[{match['text']}]({repo_url.rstrip('/')}/{resolved}{fragment})"
        return match["text"]

    out, fenced = [], False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        out.append(line if fenced or _FENCE.match(line) else _LINK.sub(replace, line))
    return "".join(out)


def source_pages(root: Path) -> list[str]:
    """The repository's Markdown pages that make the site (README.md and docs/, recursively)."""
    docs = sorted(path.relative_to(root).as_posix() for path in (root / DOCS_DIR).rglob("*.md"))
    return [HOME_PAGE, *docs]


def assemble(root: Path, out: Path, repo_url: str | None = None) -> list[str]:
    """Write the site's pages under out (emptied first); return their site paths."""
    if out.exists():
        shutil.rmtree(out)
    pages = site_pages(source_pages(root))
    for source, target in pages.items():
        text = rewrite_links(
            (root / source).read_text(),
            source,
            pages,
            lambda path: (root / path).exists(),
            repo_url,
        )
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        (out / target).write_text(text)
    return sorted(pages.values())


def github_url(environ: Mapping[str, str]) -> str | None:
    """The repository's tree URL on GitHub Actions (GITHUB_SERVER_URL etc.), else None."""
    server, repository = environ.get("GITHUB_SERVER_URL"), environ.get("GITHUB_REPOSITORY")
    if not (server and repository):
        return None
    ref = environ.get("GITHUB_SHA") or "HEAD"
    return f"{server}/{repository}/tree/{ref}"


def nav_pages(config: Mapping[str, Any]) -> list[str]:
    """Every page mkdocs.yml's nav names."""

    def walk(item: Any) -> Iterator[str]:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from walk(value)
        elif isinstance(item, list):
            for value in item:
                yield from walk(value)

    return list(walk(config.get("nav") or []))


def build(root: Path, repo_url: str | None = None) -> Path:
    """Reference pages, build/site-src, then `mkdocs build --strict`; returns the site's dir."""
    for relative in write_pages(root, reference_pages(root)):
        print(f"wrote {relative}")
    pages = assemble(root, root / SITE_SRC, repo_url)
    config = yaml.safe_load((root / MKDOCS_CONFIG).read_text())
    missing = sorted(set(pages) - set(nav_pages(config)))
    if missing:
        raise SystemExit(f"{MKDOCS_CONFIG}: add to nav: {', '.join(missing)}")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean"]
    command += ["--config-file", str(MKDOCS_CONFIG), "--site-dir", str(SITE_DIR)]
    # Material's banner about its end of life is not a warning of this build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=root, env=env, check=False)
    if result.returncode:
        raise SystemExit(f"mkdocs build --strict failed (exit {result.returncode})")
    return root / SITE_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcam_pipeline.review.site")
    parser.add_argument("action", choices=["build", "check", "reference"])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository")
    args = parser.parse_args(argv)
    if args.action == "check":
        messages = stale_pages(args.root, reference_pages(args.root))
        for message in messages:
            print(message, file=sys.stderr)
        if not messages:
            print(f"{', '.join(str(p) for p in (PARAMS_PAGE, CLI_PAGE))} match the code")
        return 1 if messages else 0
    if args.action == "reference":
        written = write_pages(args.root, reference_pages(args.root))
        print("\n".join(f"wrote {p}" for p in written) or "reference pages up to date")
        return 0
    site = build(args.root, github_url(os.environ))
    print(f"site: {site / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
