"""The documentation: the mkdocs site builds with `--strict` offline (no broken link, anchor, page or API
reference), every public module has an API page, and the README stays a landing page that carries the exact
commands CI runs."""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def docs_module(name: str):
    """A helper module of docs/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def public_modules() -> set[str]:
    """Every module of the package whose dotted name has no part starting with `_` (as docs/api_pages.py finds)."""
    return set(docs_module("api_pages").public_modules(ROOT / "loki"))


def api_references() -> dict[str, str]:
    """`::: module` directives of the API pages: module -> page."""
    return {
        m: p.name for p in (DOCS / "api").glob("*.md") for m in re.findall(r"^::: ([\w.]+)", p.read_text(), flags=re.M)
    }


def nav_pages(nav) -> set[str]:
    """Every page path named in mkdocs.yml's `nav`."""
    if isinstance(nav, str):
        return {nav}
    items = nav.values() if isinstance(nav, dict) else nav
    return set().union(*(nav_pages(i) for i in items))


def test_every_public_module_has_an_api_page_and_every_api_page_names_a_module():
    refs = api_references()
    assert set(refs) - public_modules() == set(), "API pages name modules that no longer exist: run docs/api_pages.py"
    missing = public_modules() - set(refs)
    assert not missing, f"public modules without an API page: run docs/api_pages.py: {missing}"


def test_every_docs_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == nav_pages(config["nav"]), "every page under docs/ is listed once in mkdocs.yml's nav"


def test_readme_is_a_landing_page_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "the README is a landing page; move detail into docs/"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme, "`.ci/run` runs exactly the README's test command"
    assert ".venv/bin/loki demo" in readme


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "benchmarks/README.md"])
def test_repository_markdown_links_resolve(page):
    """The Markdown files outside the site (GitHub shows them) link only to files that exist."""
    source = ROOT / page
    targets = re.findall(r"\]\(([^)\s]+)\)", source.read_text())
    broken = [
        t
        for t in targets
        if "://" not in t and not t.startswith("#") and not (source.parent / t.split("#")[0]).exists()
    ]
    assert not broken, f"{page} links to files that do not exist: {broken}"


def test_contributing_table_names_modules_that_exist():
    """CONTRIBUTING.md's "where each kind of change goes" names files under loki/ (or from the root) that exist."""
    table = (ROOT / "CONTRIBUTING.md").read_text().split("## Where each kind of change goes", 1)[1]
    named = {n for row in table.splitlines() if row.startswith("| ") for n in re.findall(r"`([\w/]+\.py|\w+/)`", row)}
    assert named, "the table is there"
    missing = [
        n
        for n in named
        if not ((ROOT / "loki" / n).exists() or (ROOT / n).exists() or any((ROOT / "loki").glob(f"*/{n}")))
    ]
    assert not missing, f"CONTRIBUTING.md names modules that do not exist: {missing}"


def test_the_top_level_is_what_the_docs_list():
    """`loki.__all__` holds the verbs and the core types, and is exactly what the package docstring (the API index
    page, `::: loki`) and the README's "The verbs" name at the top level; helpers live one level down
    (`loki.implant.make_delta`, `loki.retain.retain_set`, ...), and a module named there is not counted."""
    import inspect

    import loki

    def top_level(text: str) -> set[str]:
        names = set(re.findall(r"`(?:loki\.)?([A-Za-z_]\w*)", text))
        return {n for n in names if hasattr(loki, n) and not inspect.ismodule(getattr(loki, n))}

    public = set(loki.__all__)
    assert top_level(loki.__doc__) == public, "loki's docstring and loki.__all__ differ"
    verbs = (ROOT / "README.md").read_text().split("## The verbs", 1)[1].split("\n## ", 1)[0]
    assert top_level(verbs) == public, "README's 'The verbs' and loki.__all__ differ"
    stray = {n for n in dir(loki) if not n.startswith("_") and not inspect.ismodule(getattr(loki, n))} - public
    stray.discard("annotations")  # `from __future__ import annotations`
    assert not stray, f"top-level names outside loki.__all__ (import them one level down): {sorted(stray)}"


def test_doctest_fences_extension_examples():
    assert doctest.testmod(docs_module("doctest_fences")).failed == 0


@pytest.mark.slow  # a subprocess that builds the whole site, API pages included
def test_docs_build_strict_offline(tmp_path):
    """`mkdocs build --strict`: any warning (a broken link or anchor, a page outside the nav, an API reference
    that does not resolve) fails. Offline: the theme loads no web fonts and no plugin downloads anything."""
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "HF_HUB_OFFLINE": "1",
        "no_proxy": "*",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
    assert "fonts.googleapis" not in (tmp_path / "site" / "index.html").read_text()
