"""An mkdocs hook: links from a page to a file of the repository outside ``docs/``.

The pages are read in two places: on the site, and as files in the repository (GitHub,
an editor). A link such as ``[deploy/nginx/](../deploy/nginx/)`` works in the second and
points nowhere on the site, where strict mode would fail the build on it. This hook checks
that the target exists in the repository (a missing one fails the build, as a broken page
link does) and, on the site, links it to ``repo_url`` when the configuration sets one, or
leaves the link's text. Fenced code is left alone.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(([^()\s]+)\)")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    page_dir = posixpath.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(match: re.Match[str]) -> str:
        bang, text, target = match.groups()
        path, _, fragment = target.partition("#")
        if bang or not path or "://" in path or path.startswith(("/", "mailto:")):
            return match.group(0)
        relative = posixpath.normpath(posixpath.join("docs", page_dir, path))
        if relative.startswith("docs/"):
            return match.group(0)  # a page or file of the site: mkdocs checks it
        if relative.startswith("../") or not (root / relative).exists():
            raise PluginError(f"{page.file.src_uri}: link to {target!r}: no {relative} in the repository")
        if repo_url:
            kind = "tree" if (root / relative).is_dir() else "blob"
            return f"[{text}]({repo_url}/{kind}/main/{relative}{'#' + fragment if fragment else ''})"
        return text

    out, fence = [], ""
    for line in markdown.split("\n"):
        opening = _FENCE.match(line)
        if fence:
            if opening and opening.group(1).startswith(fence):
                fence = ""
        elif opening:
            fence = opening.group(1)
        else:
            line = _LINK.sub(rewrite, line)
        out.append(line)
    return "\n".join(out)
