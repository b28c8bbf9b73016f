"""Record a terminal session of the command line on the offline demo, for the README.

Runs, in a scratch folder, the commands a user would type and keeps what they print:

    grainfx compress --demo --sparsity 0.9 --out demo
    grainfx inspect demo/model.pt2 --plot structure.png
    grainfx bench demo/model.pt2 --against TEACHER_DIR --batch 8 --seq 128 --threads 2

Writes ``examples/session/session.txt`` (commands and their output) and
``examples/session/structure.png`` (the plot drawn by ``grainfx inspect``); then
``python benchmarks/readme_tables.py`` puts the session into the README.

    python examples/cli_session.py
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "examples" / "session"
GRAINFX = Path(sys.executable).parent / "grainfx"
#: A progress bar line (tqdm): of its redraws only the last is worth showing.
PROGRESS = re.compile(r"^[\w ]+:\s+\d+%\|")


def collapse_progress(text: str) -> str:
    """Keep the last line of each run of progress-bar redraws (``text=True`` has turned the
    bar's carriage returns into line breaks)."""
    lines = text.splitlines()
    kept = [
        line
        for i, line in enumerate(lines)
        if not (PROGRESS.match(line) and i + 1 < len(lines) and PROGRESS.match(lines[i + 1]))
    ]
    return "\n".join(kept)


def run(command: list[str], cwd: Path, shown: list[str], transcript: list[str]) -> str:
    print("$", " ".join(shown), flush=True)
    began = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    output = collapse_progress(done.stdout).replace(str(cwd) + "/", "")
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(shown)} failed ({done.returncode}):\n{output[-3000:]}")
    print(output, flush=True)
    transcript += [
        f"$ {' '.join(shown)}",
        output.rstrip(),
        f"# ({time.perf_counter() - began:.0f} s)",
        "",
    ]
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", default="0.9")
    parser.add_argument("--out", type=Path, default=SESSION)
    parser.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="more options for compress (e.g. --steps 4 for a quick check)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from grainfx import demo

    transcript: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        cwd = Path(scratch)
        compress = ["compress", "--demo", "--sparsity", args.sparsity, "--out", "demo", *args.extra]
        run([str(GRAINFX), *compress], cwd, ["grainfx", *compress], transcript)
        inspect = ["inspect", "demo/model.pt2", "--plot", "structure.png"]
        run([str(GRAINFX), *inspect], cwd, ["grainfx", *inspect], transcript)
        teacher = demo.cache_dir() / "minilm-rt-seed0-ep1"
        bench = ["bench", "demo/model.pt2", "--batch", "8", "--seq", "128", "--threads", "2"]
        run(
            [str(GRAINFX), *bench, "--against", str(teacher)],
            cwd,
            ["grainfx", *bench, "--against", "~/.cache/grainfx/minilm-rt-seed0-ep1"],
            transcript,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(cwd / "structure.png", args.out / "structure.png")
    (args.out / "session.txt").write_text("\n".join(transcript))
    print(f"wrote {args.out / 'session.txt'} and {args.out / 'structure.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
