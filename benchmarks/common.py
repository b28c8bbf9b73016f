"""Shared benchmark helpers: a resumable JSON result store and the machine description."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class ResultStore:
    """Records keyed by id in one JSON file, rewritten (atomically) after every update.

    Several processes may fill one store (say, two halves of a sweep): every update re-reads
    the file under a lock and merges, so no process drops another's records.
    """

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        data = self._read()
        self.meta = {**data.get("meta", {}), **meta}
        self.records: dict[str, dict] = data.get("records", {})

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        self.records = {**self._read().get("records", {}), **self.records}
        return key in self.records

    def put(self, key: str, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.records = {**self._read().get("records", {}), **self.records, key: record}
            self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=1))
        os.replace(tmp, self.path)


def machine() -> dict:
    """What the numbers were measured on."""
    return {"torch": torch.__version__, "cpus": os.cpu_count(), "processor": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def save_dense(model: torch.nn.Module, batch: dict, path: Path) -> Path:
    """The dense model captured by the same pass as the students, saved once as a .pt2: the
    reference ``benchmarks/speed.py`` times the compact models against."""
    import passes

    path = Path(path)
    if not path.exists():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        passes.save(passes.capture(model, inputs), path)
    return path
