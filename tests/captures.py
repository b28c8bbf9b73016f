"""Shared, cached captures of the tiny test models (capturing takes about a second each).

The cached graphs are shared by every test module: tests must not modify them (instrument
returns a copy; tests that train capture their own).
"""

from __future__ import annotations

import functools

from passes.capture import capture, capture_pair
from passes.discover import discover
from tests.models import build, example_inputs


@functools.cache
def model(arch_id: str):
    return build(arch_id)


@functools.cache
def captured(arch_id: str):
    """The eval-mode graph of ``arch_id``, captured at batch 2, sequence 8."""
    return capture(model(arch_id), example_inputs(arch_id, 2, 8))


@functools.cache
def structure(arch_id: str):
    return discover(captured(arch_id))


@functools.cache
def pair(arch_id: str):
    """``(eval_gm, train_gm)`` of ``arch_id`` from capture_pair (not the graph of captured())."""
    return capture_pair(model(arch_id), example_inputs(arch_id, 2, 8))
