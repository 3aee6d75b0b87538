"""Where the repository is, for tests that run its code as a user would."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the folder holding ``pyproject.toml``."""
