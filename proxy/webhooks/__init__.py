"""Deployment markers from signed Gitea/Forgejo webhooks and GitLab jobs."""
