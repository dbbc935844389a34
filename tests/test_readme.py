"""The README and the pages stay true: every setting is in the settings table (docs/operations.md),
Quick start is two commands and the test command is the one CI runs, and every page the README
links to exists."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.settings.config import OPTIONS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
SETTINGS_PAGE = (ROOT / "docs" / "operations.md").read_text()


def test_every_setting_is_documented_with_its_default() -> None:
    for option in OPTIONS:
        default = f"`{option.default}`" if option.default else "—"
        assert re.search(rf"\| `{option.env}` \| {re.escape(default)} \|", SETTINGS_PAGE), option.env


def test_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    section = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in section.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("tracegate demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_links_to_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert any(target.startswith("docs/") for target in targets)
    assert [t for t in targets if "://" not in t and not (ROOT / t).exists()] == []
