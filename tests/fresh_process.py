"""Run a test script in a fresh Python process that cannot import transformers: what a
user serving a compact model on a machine with torch alone would have."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCK_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # any import of transformers now fails
try:
    import transformers
except ImportError:
    pass
else:
    raise SystemExit("transformers was importable")
"""


def run_without_transformers(
    body: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``body`` (dedented) after a preamble that makes ``import transformers`` fail, run from
    the repository root; the caller checks the return code and reads stdout."""
    script = _BLOCK_TRANSFORMERS + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
