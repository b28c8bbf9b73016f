"""Peak memory of ``grainfx predict`` on 10k, 100k and 1M stdin lines: flat in the number of
lines (read, predicted and printed a batch at a time).

The model is the tiny random BERT of the command-line tests, compressed in a few steps (what
is measured is the reading and writing, not the model). Each count runs in a fresh process
under a wrapper that reads its peak RSS (``ru_maxrss`` of the child) and the time to its
first output line::

    OMP_NUM_THREADS=1 python -m benchmarks.predict_memory  # -> results/predict_memory.json
    OMP_NUM_THREADS=1 python -m benchmarks.predict_memory --lines 10000 100000

``--pythonpath DIR`` runs another checkout's grainfx (``python -m grainfx`` with DIR first on
the path), to compare with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "plot"]


def folder(root: Path) -> Path:
    """A compressed output folder of the tiny test model (``root/out``)."""
    from tests.grainfx.test_cli import make_workdir

    make_workdir(root)
    subprocess.run(
        [sys.executable, "-m", "grainfx", "compress", "model", "--data", "data.csv", "--out",
         "out", "--steps", "2", "--threads", "1", "--quiet"],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip
    return root / "out"


def lines_file(path: Path, count: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(count):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + "\n")
    return path


def measure(out: Path, stdin: Path, env: dict) -> dict:
    """Seconds to the first output line and to the end, and peak RSS (MiB), of one run."""
    start = time.perf_counter()
    with open(stdin) as source:
        process = subprocess.Popen(
            [sys.executable, "-m", "grainfx", "predict", str(out), "--threads", "1"],
            stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            cwd=stdin.parent,  # not a checkout: --pythonpath comes first on the path
        )  # fmt: skip
        assert process.stdout is not None
        first = process.stdout.readline()
        first_seconds = time.perf_counter() - start
        printed = 1 if first else 0
        for _ in process.stdout:
            printed += 1
        code = process.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(process.stderr.read().decode()[-2000:] if process.stderr else code)
    return {
        "lines": printed,
        "first_line_seconds": round(first_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--pythonpath", type=Path, help="run the grainfx of this checkout")
    parser.add_argument("--out", type=Path, default=RESULTS / "predict_memory.json")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: FOLDER STDIN
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.pythonpath is not None:
        env["PYTHONPATH"] = f"{args.pythonpath.resolve()}{os.pathsep}{env.get('PYTHONPATH', '')}"
    if args.one:  # one run in this fresh process: its children's peak is the run's own
        print(json.dumps(measure(Path(args.one[0]), Path(args.one[1]), env)))
        return
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        out = folder(Path(tmp))
        for count in args.lines:
            stdin = lines_file(Path(tmp) / f"{count}.txt", count)
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.predict_memory", "--one", str(out), str(stdin)]
                + (["--pythonpath", str(args.pythonpath)] if args.pythonpath else []),
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            record = {"input_lines": count, **json.loads(result.stdout)}
            print(json.dumps(record), flush=True)
            records.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "meta": {
                    "what": "grainfx predict on stdin lines, tiny random BERT output folder",
                    "command": "OMP_NUM_THREADS=1 python -m benchmarks.predict_memory",
                    "grainfx": str(args.pythonpath or "this checkout"),
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                },
                "records": records,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
