"""The documentation site builds, strictly, and reads in order.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from the
navigation, a file a snippet includes that is not there, or a repository link
(``docs/repo_links.py``) to a file that does not exist. The examples on the pages are run by
tests/test_readme_examples.py. mkdocs comes with the test extra; without it the build is
skipped, except under CI (``CI=true``), where that fails.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def _require_mkdocs() -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mkdocs-material is not installed (pip install -e '.[test]')", pytrace=False)
        pytest.skip("mkdocs-material is not installed (pip install -e '.[docs]')")


class _ConfigLoader(yaml.SafeLoader):
    """mkdocs.yml as data: its ``!relative`` tags read as plain strings."""


_ConfigLoader.add_constructor("!relative", lambda loader, node: loader.construct_scalar(node))  # type: ignore[arg-type]


def nav_pages() -> list[str]:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_ConfigLoader)

    def walk(entries: list[Any]) -> list[str]:
        pages: list[str] = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            pages += walk(value) if isinstance(value, list) else [value]
        return pages

    return walk(config["nav"])


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    _require_mkdocs()
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=tmp_path, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    pages = {path.relative_to(site).as_posix(): path.read_text() for path in site.rglob("*.html")}
    # Every fence became a code block, the marked ones (```yaml policy) included.
    assert [name for name, page in pages.items() if "```" in page] == []
    # What the pages include from outside docs/ arrived.
    assert [name for name, page in pages.items() if re.search(r"(^|<p>)--8&lt;--", page, re.M)] == []
    text = {name: html.unescape(re.sub(r"<[^>]+>", "", page)) for name, page in pages.items()}
    assert "identity-aware reverse proxy" in text["index.html"]
    assert ".venv/bin/tracegate demo" in text["getting-started/index.html"]
    assert "What tracegate trusts" in text["security/index.html"]
    assert "ExecStart=/opt/tracegate/bin/tracegate serve" in text["deploy-systemd/index.html"]


def test_every_page_is_in_the_navigation_and_serve_comes_before_the_internals() -> None:
    pages = nav_pages()
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md"))
    assert len(pages) == len(set(pages))
    assert pages[:2] == ["index.md", "getting-started.md"]
    assert "tracegate serve --policies policies/" in (DOCS / "getting-started.md").read_text()
    internals = ["tokens.md", "upstream.md", "development.md", "layout.md", "benchmarks.md"]
    assert min(pages.index(p) for p in internals) > pages.index("getting-started.md")


def _repo_links() -> Any:
    spec = importlib.util.spec_from_file_location("repo_links", DOCS / "repo_links.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_links_to_repository_files_are_checked_and_kept_working_on_the_site() -> None:
    _require_mkdocs()
    from mkdocs.exceptions import PluginError

    hook = _repo_links()
    page = SimpleNamespace(file=SimpleNamespace(src_uri="gateway.md"))
    config = {"docs_dir": str(DOCS), "repo_url": ""}
    text = "[`deploy/nginx/`](../deploy/nginx/), [a page](metrics.md#metrics), [web](https://example.com/x)"
    assert hook.on_page_markdown(text, page, config, None) == (
        "`deploy/nginx/`, [a page](metrics.md#metrics), [web](https://example.com/x)"
    )
    with_url = {**config, "repo_url": "https://git.example.com/platform/tracegate/"}
    assert hook.on_page_markdown("[the unit](../deploy/systemd/tracegate.service)", page, with_url, None) == (
        "[the unit](https://git.example.com/platform/tracegate/blob/main/deploy/systemd/tracegate.service)"
    )
    fenced = "```sh\necho [x](../nowhere)\n```\n"
    assert hook.on_page_markdown(fenced, page, config, None) == fenced
    with pytest.raises(PluginError, match=re.escape("no deploy/nowhere.conf in the repository")):
        hook.on_page_markdown("see [it](../deploy/nowhere.conf)", page, config, None)
