"""Checkpoints: saved every N steps and on interrupt, resumed to the same masks, weights and
scores as an uninterrupted run; files from another run or not checkpoints are refused."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

import grainfx
from grainfx import CheckpointConfig, CheckpointError, ConfigError, GrainConfig
from grainfx import checkpoint as checkpoints
from grainfx.preflight import PreflightError
from tests.models import build, example_inputs

ARCH = "bert-sdpa"
STEPS = 20
TEXT = {"capture_output": True, "text": True, "check": True}


def data() -> list[dict]:
    return [example_inputs(ARCH, 4, 10, seed=i) for i in range(3)]


def compress(checkpoint=None, callback=None, **config):
    return grainfx.compress(
        build(ARCH),
        data(),
        0.6,
        config=GrainConfig(steps=STEPS, **config),
        progress=False,
        callback=callback,
        checkpoint=checkpoint,
    )


def stop_at(step: int):
    def callback(index, masks):
        if index == step:
            raise KeyboardInterrupt

    return callback


def assert_same_result(a, b) -> None:
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
        assert torch.equal(a.scores[name], b.scores[name]), name
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert a.report["kd_loss"] == b.report["kd_loss"]


@pytest.mark.parametrize("stop", [2, 7, 13])  # before, during and after the pruning ramp
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, stop):
    path = tmp_path / "run.ckpt"
    whole = compress()
    with pytest.raises(KeyboardInterrupt):
        compress(CheckpointConfig(path, every=100), callback=stop_at(stop))
    assert torch.load(path, weights_only=True)["steps_done"] == stop + 1
    resumed = compress(CheckpointConfig(path, every=100, resume=True))
    assert resumed.report["steps"] == STEPS
    assert_same_result(whole, resumed)
    masks_moved = any(not torch.equal(m, torch.ones_like(m)) for m in whole.masks.values())
    assert masks_moved


def test_a_resumed_latency_aware_run_keeps_the_prices_it_measured(tmp_path, monkeypatch):
    # prices are timed, so a second measurement differs: the resumed run must rank with the
    # first one's (read from the checkpoint) and not time them again
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress(CheckpointConfig(path, every=100), callback=stop_at(7), latency_aware=True)
    measured = torch.load(path, weights_only=True)["importance"]["prices"]
    assert measured

    def timed_again(*args, **kwargs):
        raise AssertionError("a resumed run timed the head prices again")

    monkeypatch.setattr("grainfx.importance.head_prices", timed_again)
    resumed = compress(CheckpointConfig(path, every=100, resume=True), latency_aware=True)
    assert resumed.report["latency_prices"] == measured


def test_a_resumed_run_reads_its_checkpoint_once(tmp_path, monkeypatch):
    # the checkpoint holds weights and optimizer state: the preflight reads it, and the prices
    # and the restore use that state instead of reading the file again
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress(CheckpointConfig(path, every=100), callback=stop_at(7), latency_aware=True)
    reads = []
    load = torch.load

    def counted(file, *args, **kwargs):
        reads.append(file)
        return load(file, *args, **kwargs)

    monkeypatch.setattr("grainfx.checkpoint.torch.load", counted)
    resumed = compress(CheckpointConfig(path, every=100, resume=True), latency_aware=True)
    assert resumed.report["steps"] == STEPS
    assert reads == [path]


def test_checkpoint_every_n_steps(tmp_path):
    path = tmp_path / "run.ckpt"
    seen = []
    compress(
        CheckpointConfig(path, every=6),
        callback=lambda i, m: seen.append(
            torch.load(path, weights_only=True)["steps_done"] if path.exists() else 0
        ),
    )
    # the callback of step i runs before the save after step i
    assert seen[5] == 0 and seen[6] == 6 and seen[12] == 12 and seen[18] == 18
    # and once at the end, so that a run whose result cannot be written resumes from there
    assert torch.load(path, weights_only=True)["steps_done"] == STEPS


def test_a_finished_checkpoint_resumes_on_the_same_inputs_only(tmp_path):
    """The checkpoint saved when training ends: resuming on other inputs is refused before
    anything is built (the dataloader here is empty); on the same ones it gives the same
    result without training again."""
    path = tmp_path / "run.ckpt"
    identity = {"--data file": "sha256:aaaa", "tokenizer": "t"}
    first = compress(CheckpointConfig(path, identity=identity))
    with pytest.raises(
        CheckpointError,
        match=r"other inputs \(--data file changed: --data file: "
        r"sha256:aaaa there, sha256:bbbb now\)",
    ):
        grainfx.compress(
            build(ARCH),
            [],
            0.6,
            checkpoint=CheckpointConfig(
                path, resume=True, identity={**identity, "--data file": "sha256:bbbb"}
            ),
        )
    seen = []
    again = compress(
        CheckpointConfig(path, resume=True, identity=identity), callback=lambda i, m: seen.append(i)
    )
    assert seen == [] and again.report["steps"] == STEPS
    assert_same_result(first, again)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress(CheckpointConfig(path), callback=stop_at(3))
    with pytest.raises(CheckpointError, match="another run.*learning_rate=3e-05 there, 0.001 now"):
        compress(CheckpointConfig(path, resume=True), learning_rate=1e-3)


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*missing.ckpt to resume from"):
        CheckpointConfig(tmp_path / "missing.ckpt", resume=True)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_resume_from_a_file_that_is_no_checkpoint(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"some": "dict"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.ckpt is not a (readable )?grainfx checkpoint"):
        compress(CheckpointConfig(path, resume=True))


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_bad_checkpoint_interval(tmp_path, every):
    with pytest.raises(ConfigError, match="every must be an integer >= 1"):
        CheckpointConfig(tmp_path / "x", every=every)


def test_a_checkpoint_location_that_cannot_be_written_fails_before_any_step(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(
        PreflightError,
        match=r"cannot write the checkpoint .*file/run.ckpt: "
        r".*file is a file, not a folder",
    ):
        compress(CheckpointConfig(tmp_path / "file" / "run.ckpt"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(
        PreflightError,
        match=r"1000 bytes free, about \d+\.\d KB needed for a "
        r"checkpoint",
    ):
        compress(CheckpointConfig(tmp_path / "run.ckpt"))


@contextlib.contextmanager
def disk_full_at(size: int) -> Iterator[None]:
    """Within: no file of this process grows past ``size`` bytes, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress(CheckpointConfig(path), callback=stop_at(3))
    before = path.read_bytes()
    with (
        disk_full_at(len(before) // 2),
        pytest.raises(
            CheckpointError,
            match=r"cannot write the checkpoint .*run.ckpt \(File "
            r"too large\): free disk space or choose "
            r"another checkpoint path \(--checkpoint\); the "
            r"previous checkpoint is intact",
        ),
    ):
        compress(CheckpointConfig(path, every=2, resume=True))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_two_runs_write_their_checkpoints_under_distinct_temporary_names(tmp_path):
    """Each process writes a checkpoint under its own temporary name: a save neither
    overwrites nor removes the one another live run is writing, and removes those of
    processes that are gone."""
    path = tmp_path / "run.ckpt"
    code = (
        "import sys; from pathlib import Path; from grainfx.checkpoint import temporary; "
        "print(temporary(Path(sys.argv[1])))"
    )
    names = [
        subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len({*names, str(checkpoints.temporary(path))}) == 3, names
    assert checkpoints.temporary(path) == tmp_path / f".run.ckpt.{os.getpid()}.tmp"
    writing = checkpoints.temporary(path).with_name(f".run.ckpt.{os.getppid()}.tmp")
    writing.write_bytes(b"another run's half-written checkpoint")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **TEXT)
    stale = path.with_name(f".run.ckpt.{gone.stdout.strip()}.tmp")
    stale.write_bytes(b"what a kill -9 left")
    compress(CheckpointConfig(path))
    assert torch.load(path, weights_only=True)["steps_done"] == STEPS
    assert writing.read_bytes() == b"another run's half-written checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.ckpt", writing.name])


def test_a_final_checkpoint_that_cannot_be_written_keeps_the_result(tmp_path, caplog):
    """Training is done and the result whole: a full disk at the last save is a warning."""
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress(CheckpointConfig(path), callback=stop_at(3))
    before = path.read_bytes()
    with disk_full_at(len(before) // 2):
        resumed = compress(CheckpointConfig(path, resume=True))
    assert resumed.report["steps"] == STEPS
    assert f"cannot write the final checkpoint {path} (File too large)" in caplog.text
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
