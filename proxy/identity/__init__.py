"""Identity: who is this? Credentials in, a verified identity out.

Token extraction and verification (``identify``), the issuers' signing keys (``keys``),
the forges' claim shapes (``forges``: GitLab, GitHub Actions, Forgejo Actions) and the
verified-token cache (``token_cache``).

May import: policy (its model and matchers), settings, observe and the leaves.
"""
