"""The repository's own papers: LICENSE is the license ``pyproject.toml`` declares, whole
and unedited; CHANGELOG.md keeps the Keep a Changelog shape, and names only settings that
exist."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from proxy.settings.config import OPTIONS

ROOT = Path(__file__).parent.parent
#: sha256 of the Apache License 2.0 as apache.org publishes it (LICENSE-2.0.txt), its words
#: joined by single spaces: the layout may differ, not one word.
APACHE_2_0_WORDS_SHA256 = "0ffddef9e48f8a09aed5caf2d44f7ba1c1be2d9b8e0a6f693b1635b2d5566645"
#: Keep a Changelog's kinds of change, in its order.
KINDS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")


def test_the_license_file_is_the_license_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["license"]
    assert (declared["text"] if isinstance(declared, dict) else declared) == "Apache-2.0"
    words = (ROOT / "LICENSE").read_text().split()
    assert words[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert hashlib.sha256(" ".join(words).encode()).hexdigest() == APACHE_2_0_WORDS_SHA256


def test_the_changelog_keeps_its_shape() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text
    releases = re.findall(r"^## (.+)$", text, re.M)
    assert releases[0] == "[Unreleased]"
    for release in releases[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", release), release
    for section in re.split(r"^## .+$", text, flags=re.M)[1:]:
        kinds = re.findall(r"^### (.+)$", section, re.M)
        assert kinds, "a release with no changes"
        assert [k for k in KINDS if k in kinds] == kinds, f"unknown or out of order: {kinds}"


def test_the_changelog_names_only_real_settings() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    from proxy.dev.loop import TOKEN_VARIABLE

    settings = {o.env for o in OPTIONS} | {"TRACEGATE_FUZZ_EXAMPLES", TOKEN_VARIABLE}  # the fuzzer's; dev's
    # The secret stores' settings, read where the stores are (proxy/settings/secret_stores.py).
    settings |= set(re.findall(r"TRACEGATE_[A-Z_]+[A-Z]", (ROOT / "proxy/settings/secret_stores.py").read_text()))
    named = set(re.findall(r"TRACEGATE_[A-Z_]+[A-Z]", text))
    assert named and named <= settings, named - settings
