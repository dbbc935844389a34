"""Gitea webhook payloads shaped after Gitea's documented structures (api.PushPayload,
api.CreatePayload, api.ReleasePayload), and the signing Gitea does."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

AFTER = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
BEFORE = "1111111111111111111111111111111111111111"
TAG_SHA = "2222222222222222222222222222222222222222"
RELEASE_SHA = "3333333333333333333333333333333333333333"


def repository(full_name: str = "payments/api", host: str = "https://gitea.example.com") -> dict[str, Any]:
    owner, name = full_name.split("/", 1)
    return {
        "id": 7,
        "name": name,
        "full_name": full_name,
        "private": True,
        "fork": False,
        "html_url": f"{host}/{full_name}",
        "clone_url": f"{host}/{full_name}.git",
        "ssh_url": f"git@gitea.example.com:{full_name}.git",
        "default_branch": "main",
        "owner": {"id": 3, "login": owner, "username": owner, "full_name": owner.title()},
    }


def user(login: str = "alice") -> dict[str, Any]:
    return {"id": 17, "login": login, "username": login, "email": f"{login}@example.com", "full_name": login.title()}


def push(ref: str = "refs/heads/main", after: str = AFTER, repo: str = "payments/api") -> dict[str, Any]:
    commit = {
        "id": after,
        "message": "Fix rounding in invoice totals\n\nLonger body.",
        "url": f"https://gitea.example.com/{repo}/commit/{after}",
        "author": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
        "committer": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
        "timestamp": "2026-11-21T08:00:00Z",
        "added": [],
        "removed": [],
        "modified": ["invoice.py"],
    }
    return {
        "ref": ref,
        "before": BEFORE,
        "after": after,
        "compare_url": f"https://gitea.example.com/{repo}/compare/{BEFORE[:10]}...{after[:10]}",
        "commits": [commit],
        "total_commits": 1,
        "head_commit": commit,
        "repository": repository(repo),
        "pusher": user(),
        "sender": user(),
    }


def create_tag(tag: str = "v1.4.0", sha: str = TAG_SHA, repo: str = "payments/api") -> dict[str, Any]:
    return {"sha": sha, "ref": tag, "ref_type": "tag", "repository": repository(repo), "sender": user()}


def release(tag: str = "v1.4.0", target: str = RELEASE_SHA, action: str = "published") -> dict[str, Any]:
    return {
        "action": action,
        "release": {
            "id": 5,
            "tag_name": tag,
            "target_commitish": target,
            "name": f"Release {tag}",
            "body": "notes",
            "draft": False,
            "prerelease": False,
            "author": user(),
            "url": "",
            "html_url": "",
        },
        "repository": repository(),
        "sender": user(),
    }


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def gitea_headers(
    event: str, signed: bytes, secret: str | None, *, source: str = "Gitea", delivery: str | None = None
) -> dict[str, str]:
    """Headers as Gitea sends them; with no secret, the signature headers are empty."""
    digest = sign(signed, secret) if secret else ""
    delivery = delivery or str(uuid.uuid4())
    return {
        f"X-{source}-Event": event,
        f"X-{source}-Delivery": delivery,
        f"X-{source}-Signature": digest,
        "X-Hub-Signature-256": f"sha256={digest}" if digest else "",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
    }


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, indent=2).encode()
