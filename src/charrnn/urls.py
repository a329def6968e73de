"""Telling an http(s) URL from a path or another scheme (``data.source``, the MLflow tracking URI)."""

from __future__ import annotations


def is_http_url(text: str) -> bool:
    """Whether ``text`` names an http:// or https:// resource: a download, or a tracking server."""
    return text.startswith(("http://", "https://"))
