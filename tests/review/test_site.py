"""The documentation site (mkdocs.yml, pcam_pipeline.review.site): the reference pages are what
the code gives (a changed default or Literal makes them stale, and the check says so), every key
and command is on them, and the site builds with --strict without touching the network."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field

from pcam_pipeline.cli import build_parser
from pcam_pipeline.params import Params
from pcam_pipeline.review import site
from tests.conftest import REPO_ROOT

PAGES_WORKFLOW = REPO_ROOT / ".github" / "workflows" / "pages.yml"


def run_site(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pcam_pipeline.review.site", *args],
        cwd=REPO_ROOT,
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )


def project_copy(tmp_path: Path) -> Path:
    """What the reference pages and the site are made from, copied: the check and the build
    run on it, not on the checkout."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("README.md", "mkdocs.yml", "params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "docs", root / "docs")
    shutil.copytree(REPO_ROOT / "reports" / "gpu-check", root / "reports" / "gpu-check")
    return root


# --- the committed reference pages ------------------------------------------------------------


def test_docs_check_passes_on_the_repository():
    """`make docs-check` (the pages workflow runs it): docs/reference matches the code."""
    assert site.stale_pages(REPO_ROOT, site.reference_pages(REPO_ROOT)) == []
    result = run_site("check")
    assert result.returncode == 0, result.stderr
    assert "match the code" in result.stdout


def test_a_changed_default_makes_the_params_page_stale_and_the_fix_freshens_it(tmp_path: Path):
    root = project_copy(tmp_path)
    params = root / "params.yaml"
    text = params.read_text()
    assert re.search(r"^  epochs: 4 *$", text, re.M)
    params.write_text(re.sub(r"^  epochs: 4", "  epochs: 5", text, flags=re.M))
    stale = run_site("check", "--root", str(root))
    assert stale.returncode == 1
    assert "docs/reference/params.md is stale" in stale.stderr
    assert "make docs-reference" in stale.stderr
    assert "cli.md" not in stale.stderr
    fixed = run_site("reference", "--root", str(root))
    assert fixed.returncode == 0 and "wrote docs/reference/params.md" in fixed.stdout
    assert "| `train.epochs` | int | `5` |" in (root / site.PARAMS_PAGE).read_text()
    assert run_site("check", "--root", str(root)).returncode == 0


def test_a_changed_comment_or_a_missing_page_is_named(tmp_path: Path):
    root = project_copy(tmp_path)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("# sgd only", "# sgd only (nesterov off)"))
    (root / site.CLI_PAGE).unlink()
    messages = site.stale_pages(root, site.reference_pages(root))
    assert messages == [
        "docs/reference/params.md is stale: the code gives a different page. "
        "Run `make docs-reference` and commit it.",
        "docs/reference/cli.md is missing: the code gives a different page. "
        "Run `make docs-reference` and commit it.",
    ]


def params_module_with(tmp_path: Path, *edits: tuple[str, str]):
    """params.py copied with edits, imported as a module of its own (the real one untouched)."""
    text = (REPO_ROOT / "src" / "pcam_pipeline" / "params.py").read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "edited_params.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("edited_params", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds the comments through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_changed_literal_or_bound_in_params_py_makes_the_page_stale(tmp_path: Path):
    edited = params_module_with(
        tmp_path,
        ('optimizer: Literal["adamw", "sgd"]', 'optimizer: Literal["adamw", "sgd", "lion"]'),
        ("opset: int = Field(ge=13, le=20)", "opset: int = Field(ge=13, le=21)"),
    )
    pages = site.reference_pages(REPO_ROOT, model=edited.Params)
    assert site.stale_pages(REPO_ROOT, pages) == [
        "docs/reference/params.md is stale: the code gives a different page. "
        "Run `make docs-reference` and commit it."
    ]
    page = pages[site.PARAMS_PAGE]
    assert "| `train.optimizer` | str | `adamw` | `adamw`, `sgd`, `lion` |" in page
    assert "| `export.opset` | int | `17` | 13 ≤ x ≤ 21 |" in page


def params_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the model, written here independently of the generator."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        paths.append(path)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += params_paths(annotation, f"{path}.")
    return paths


def yaml_paths(mapping: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in mapping.items():
        paths.append(f"{prefix}{key}")
        if isinstance(value, dict):
            paths += yaml_paths(value, f"{prefix}{key}.")
    return paths


def test_every_params_key_is_on_the_params_page():
    page = (REPO_ROOT / site.PARAMS_PAGE).read_text()
    rows = set(re.findall(r"^\| `([\w.]+)` \|", page, re.M))
    keys = params_paths(Params)
    assert len(keys) > 80 and "validate.black_level" in keys and "export.int8.seed" in keys
    sections = {key for key in keys if "." not in key}
    assert {f"## {section}" for section in sections} <= set(page.splitlines())
    assert set(keys) - sections == rows
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert set(yaml_paths(raw)) <= set(keys)
    # the committed value, the bounds and the comments come from the files
    assert (
        "| `validate.white_level` | int | `245` | 0 ≤ x ≤ 255 | validate, preprocess | "
        'a patch whose every pixel is &gt;= this is "all white" |'
    ) in page
    assert '| `train.compile` | str | `"off"` | `off`, `default`, `reduce-overhead` |' in page
    assert "| `train.devices` | str \\| int | `auto` | `auto` or ≥ 1 |" in page


def test_every_command_and_option_is_on_the_cli_page():
    page = (REPO_ROOT / site.CLI_PAGE).read_text()
    headings = set(re.findall(r"^## (pcam.*)$", page, re.M))

    def walk(parser, prog):
        yield prog, parser
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prog} {name}")

    commands = dict(walk(build_parser(), "pcam"))
    assert {"pcam train", "pcam weights download", "pcam search", "pcam predict"} <= set(commands)
    assert headings == set(commands)
    for prog, parser in commands.items():
        section = page.split(f"\n## {prog}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            if action.help == "==SUPPRESS==" or action.__class__.__name__.startswith(
                ("_Help", "_SubParsers")
            ):
                continue
            for option in action.option_strings:
                assert f"`{option}" in section or f", {option}" in section, (prog, option)
    assert "--worker " not in page and "`--worker`" not in page, "a SUPPRESSed option is shown"
    assert "| `--device {auto,cpu,cuda}` | `auto` | `auto`, `cpu`, `cuda` |" in page
    assert "95% interval" in page and "PREFIX-s&lt;seed&gt;" in page


# --- the generator's parts ----------------------------------------------------------------------


def test_yaml_keys_reads_trailing_continued_and_leading_comments():
    header, keys = site.yaml_keys(
        textwrap.dedent(
            """\
            # The file's header
            # on two lines.

            a:                 # section a
              b: 1             # b's comment
                               # continued
              c: "x # not a comment"
              # d, from above
              d: [1, 2]

            e: off
            """
        )
    )
    assert header == "The file's header on two lines."
    assert keys == {
        "a": site.YamlKey("", "section a"),
        "a.b": site.YamlKey("1", "b's comment continued"),
        "a.c": site.YamlKey('"x # not a comment"', ""),
        "a.d": site.YamlKey("[1, 2]", "d, from above"),
        "e": site.YamlKey("off", ""),
    }


class _Typed(BaseModel):
    choice: Literal["x", "y"]
    unit: float = Field(gt=0, le=1)
    count: int = Field(ge=2)
    names: list[str] = Field(min_length=1)
    maybe: str | None


def test_describe_type_reads_literals_bounds_lists_and_unions():
    fields = _Typed.model_fields
    described = {
        name: site.describe_type(info.annotation, info.metadata) for name, info in fields.items()
    }
    assert described == {
        "choice": ("str", "`x`, `y`"),
        "unit": ("float", "0 < x ≤ 1"),
        "count": ("int", "≥ 2"),
        "names": ("list[str]", "length ≥ 1"),
        "maybe": ("str | null", "str or `null`"),
    }


def test_rerun_by_follows_dvc_yaml_params():
    stages = {"a": ["cpu", "train.seed"], "b": ["train"], "c": ["validate.black_level"]}
    assert site.rerun_by("cpu.numerics", stages) == ["a"]
    assert site.rerun_by("train.seed", stages) == ["a", "b"]
    assert site.rerun_by("train.lr", stages) == ["b"]
    assert site.rerun_by("validate", stages) == ["c"]
    assert site.rerun_by("fetch.seed", stages) == []


def test_links_are_rewritten_for_the_site():
    pages = site.site_pages(["README.md", "docs/slurm.md", "docs/reference/params.md"])
    assert pages == {
        "README.md": "index.md",
        "docs/slurm.md": "slurm.md",
        "docs/reference/params.md": "reference/params.md",
    }
    exists = {"reports/gpu-check", "Makefile"}.__contains__
    readme = (
        "See [slurm](docs/slurm.md#time-limits) and [here](#quick-start), "
        "[`make`](Makefile), [gone](docs/gone.md), [web](https://x.org/a.md).\n"
        "```\n[code](docs/slurm.md)\n```\n"
    )
    assert site.rewrite_links(readme, "README.md", pages, exists) == (
        "See [slurm](slurm.md#time-limits) and [here](#quick-start), "
        "`make`, [gone](docs/gone.md), [web](https://x.org/a.md).\n"
        "```\n[code](docs/slurm.md)\n```\n"
    )
    doc = "[home](../README.md#experiments), [p](reference/params.md), [g](../reports/gpu-check/)"
    assert site.rewrite_links(doc, "docs/slurm.md", pages, exists, "https://gh/o/r/tree/abc") == (
        "[home](index.md#experiments), [p](reference/params.md), "
        "[g](https://gh/o/r/tree/abc/reports/gpu-check)"
    )
    back = "[slurm](../slurm.md#x), [readme](../../README.md)"
    assert site.rewrite_links(back, "docs/reference/params.md", pages, exists) == (
        "[slurm](../slurm.md#x), [readme](../index.md)"
    )
    assert site.github_url(
        {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "o/r", "GITHUB_SHA": "c"}
    ) == ("https://github.com/o/r/tree/c")
    assert site.github_url({}) is None


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())
    pages = site.site_pages(site.source_pages(REPO_ROOT))
    assert sorted(site.nav_pages(config)) == sorted(pages.values())
    assert config["theme"]["font"] is False, "web fonts would be fetched from Google"
    assert config["plugins"] == ["search"]


# --- the site -----------------------------------------------------------------------------------

# Imported by every Python process of the build (PYTHONPATH): an internet socket or a name lookup
# is refused and recorded, so a build that tried and recovered is caught too.
NO_NETWORK = """\
import os, socket

_LOG = os.environ["PCAM_TEST_NETWORK_LOG"]
with open(_LOG, "a") as log:
    log.write(f"guarded {os.getpid()}\\n")


def _refuse(what, *args):
    with open(_LOG, "a") as log:
        log.write(f"attempt {what} {args!r}\\n")
    raise OSError(f"the documentation build tried the network: {what} {args!r}")


class _Socket(socket.socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse("connect", address)
        return super().connect(address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse("connect_ex", address)
        return super().connect_ex(address)


socket.socket = _Socket
socket.getaddrinfo = lambda *args, **kwargs: _refuse("getaddrinfo", *args)
socket.gethostbyname = lambda *args: _refuse("gethostbyname", *args)
"""


def offline_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    guard = tmp_path / "no-network"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    log = tmp_path / "network.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("GITHUB_")
    }
    env.update(PYTHONPATH=str(guard), PCAM_TEST_NETWORK_LOG=str(log))
    return env, log


def test_the_site_builds_strict_and_offline(tmp_path: Path):
    """`make docs` (the pages workflow runs it), on a copy: reference pages, README + docs/
    assembled, mkdocs build --strict; every page, the search index, nothing from the network."""
    root = project_copy(tmp_path)
    env, log = offline_env(tmp_path)
    result = run_site("build", "--root", str(root), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    attempts = log.read_text().splitlines()
    assert sum(line.startswith("guarded") for line in attempts) >= 2, "the guard did not load"
    assert [line for line in attempts if line.startswith("attempt")] == []
    built = root / site.SITE_DIR
    pages = ["index", "reference/params", "reference/cli", "slurm", "export", "development"]
    for page in pages:
        assert (built / f"{page}.html").is_file(), page
    index = (built / "search" / "search_index.json").read_text()
    assert "plateau_patience" in index and "pcam weights download" in index
    home = (built / "index.html").read_text()
    assert 'href="slurm.html#gpu-jobs-fail-fast"' in home, "README's docs/ links, rewritten"
    for html in built.rglob("*.html"):
        text = html.read_text()
        assert "fonts.googleapis.com" not in text, html
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', text), html
    assert "Aborted" not in result.stderr and "WARNING" not in result.stderr


def test_a_broken_anchor_fails_the_build(tmp_path: Path):
    root = project_copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    assert "(docs/slurm.md#gpu-jobs-fail-fast)" in text
    readme.write_text(text.replace("#gpu-jobs-fail-fast", "#gpu-jobs-fail-slowly"))
    env, _ = offline_env(tmp_path)
    result = run_site("build", "--root", str(root), env=env)
    assert result.returncode != 0
    assert "does not contain an anchor '#gpu-jobs-fail-slowly'" in result.stderr
    assert "mkdocs build --strict failed" in result.stderr


def test_the_pages_workflow_publishes_main_with_githubs_actions():
    workflow = yaml.safe_load(PAGES_WORKFLOW.read_text())
    on = workflow[True]  # YAML 1.1: the key `on` loads as True
    assert on["push"]["branches"] == ["main"] and "workflow_dispatch" in on
    assert workflow["concurrency"]["group"] == "pages"
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    runs = [step.get("run") for step in build["steps"]]
    assert runs.index("make docs-check") < runs.index("make docs")
    upload = [s for s in build["steps"] if "upload-pages-artifact" in s.get("uses", "")]
    assert upload and upload[0]["with"]["path"] == str(site.SITE_DIR)
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["steps"][0]["uses"].startswith("actions/deploy-pages@")
    assert workflow["permissions"] == {"contents": "read"}
