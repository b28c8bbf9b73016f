"""Shared benchmark helpers: a resumable JSON result store and the machine description."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Run:
    """One student: its target density and the GrainConfig fields that differ from GRAIN's."""

    name: str
    density: float
    label: str
    overrides: dict = field(default_factory=dict)


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


@dataclass(frozen=True)
class LMShape:
    """A Llama causal LM's size and block length: by default the LM teacher's of
    ``benchmarks/accuracy_lm.py``."""

    vocab: int = 8192
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 688
    seq: int = 128


def llama_lm(shape: LMShape, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised (``seed``) Llama causal LM of ``shape``: grouped key/value heads,
    RoPE, SwiGLU, an untied LM head; transformers' sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=max(512, shape.seq),
        use_cache=False,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def save_dense(model: torch.nn.Module, batch: dict, path: Path) -> Path:
    """The dense model captured by the same pass as the students, saved once as a .pt2: the
    reference ``benchmarks/speed.py`` times the compact models against."""
    import passes

    path = Path(path)
    if not path.exists():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        passes.save(passes.capture(model, inputs), path)
    return path


def heads_left(report: dict) -> int:
    """Heads the compact model keeps, over all layers of a compress report."""
    return sum(layer["heads"] for layer in report["layers"])


def run_record(run: Run, seed: int, result, began: float) -> dict:
    """The fields every accuracy benchmark records of a finished run: what was asked, the
    structure and parameters ``compress`` reached, and the minutes since ``began``."""
    params = result.report["parameters"]
    return {
        "label": run.label,
        "seed": seed,
        "target_density": run.density,
        "density": result.density,
        "overrides": run.overrides,
        "encoder_parameters": [params["encoder_before"], params["encoder_after"]],
        "total_parameters": [params["total_before"], params["total_after"]],
        "heads_left": heads_left(result.report),
        "layers": result.report["layers"],
        "steps": result.report["steps"],
        "minutes": (time.perf_counter() - began) / 60,
    }


def seed_key(name: str, seed: int) -> str:
    """The record key of run ``name`` with seed ``seed``: the name itself for seed 0 (the
    records from before seeds existed), ``name-s<seed>`` otherwise."""
    return name if seed == 0 else f"{name}-s{seed}"


def seed_keys(name: str, records: dict) -> list[str]:
    """The keys of every seed of run ``name`` present in ``records``, seed 0 first."""
    return [k for k in records if k == name or re.fullmatch(rf"{re.escape(name)}-s\d+", k)]


def paired_interval(
    a: torch.Tensor,
    b: torch.Tensor,
    statistic: Callable[[torch.Tensor], torch.Tensor],
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """A's metric minus B's on the same held-out examples, with a 95% paired bootstrap interval.

    ``a`` and ``b`` hold one row per held-out example (in the same order); ``statistic`` maps
    a (draws, examples, ...) tensor of rows to one metric value per draw. Every draw resamples
    examples with replacement and brings both models' rows, so the interval measures the
    difference on this data, not the spread of either model alone.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} rows for A but {len(b)} for B")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(a), (resamples, len(a)), generator=gen)
    diff = (statistic(a[draws]) - statistic(b[draws])).double()
    low, high = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
    point = float(statistic(a[None]) - statistic(b[None]))
    return {
        "difference": point,
        "low": low,
        "high": high,
        "resamples": resamples,
        "examples": len(a),
    }


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max of one metric over seeds."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {
        "mean": float(t.mean()),
        "std": std,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }
