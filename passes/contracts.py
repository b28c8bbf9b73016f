"""Pass contracts as code: what each pass requires and ensures, and whether it preserves
computation, checked after every pass in checked mode.

Each public pass is declared with :func:`contract` (``capture``, ``capture_pair``,
``discover``, ``instrument``, ``rewrite``; :data:`CONTRACTS` lists them). ``requires``
checks its arguments before it runs and ``ensures`` its result after; each returns the
broken invariant in words, or None. A pass that ``preserves_computation`` is also run against
what it was given: its outputs on the captured example inputs must equal those of its input
(the model, or the graph it transformed) to a relative 1e-4.

The checks run in checked mode only: within ``with passes.checked():``, or everywhere when
the environment sets ``GRAINFX_CHECKED=1`` (the test suite does). A broken one raises
:class:`~passes.errors.ContractError` naming the pass and the invariant, at the pass that
broke it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from passes.errors import ContractError

#: Reads a pass's bound arguments (and, for ``ensures``, its result); returns what is broken.
Check = Callable[..., "str | None"]
F = TypeVar("F", bound=Callable[..., Any])
ENV = "GRAINFX_CHECKED"
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Contract:
    """What a pass promises: ``requires(args)`` before, ``ensures(args, result)`` after,
    and, where it ``preserves_computation``, ``compare(args, result)``: the outputs of what
    it was given and of what it returned on the same inputs, as two dicts of tensors."""

    name: str
    preserves_computation: bool
    requires: Check | None = None
    ensures: Check | None = None
    compare: Callable[..., tuple[Mapping[str, Any], Mapping[str, Any]]] | None = None

    def __post_init__(self) -> None:
        if self.preserves_computation != (self.compare is not None):
            raise ValueError(f"{self.name}: a pass preserves computation exactly when it compares")


#: Every pass declared with :func:`contract`, by name.
CONTRACTS: dict[str, Contract] = {}
_checked: list[bool] = []


def is_checked() -> bool:
    """Whether contracts run now: inside :func:`checked`, or with ``GRAINFX_CHECKED=1``."""
    if _checked:
        return _checked[-1]
    return os.environ.get(ENV, "") not in ("", "0")


@contextlib.contextmanager
def checked(on: bool = True) -> Iterator[None]:
    """Within: every pass checks its contract (``on=False``: none does)."""
    _checked.append(on)
    try:
        yield
    finally:
        _checked.pop()


def contract(
    *,
    preserves_computation: bool,
    requires: Check | None = None,
    ensures: Check | None = None,
    compare: Callable[..., tuple[Mapping[str, Any], Mapping[str, Any]]] | None = None,
) -> Callable[[F], F]:
    """Declare the contract of the pass it decorates (see the module docstring)."""

    def declare(fn: F) -> F:
        promise = Contract(fn.__name__, preserves_computation, requires, ensures, compare)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not is_checked():
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            _hold(promise, "requires", promise.requires, arguments)
            with checked(False):  # a pass made of passes answers for itself
                result = fn(*args, **kwargs)
                _hold(promise, "ensures", promise.ensures, arguments, result)
                if promise.compare is not None:
                    with torch.no_grad():
                        before, after = promise.compare(arguments, result)
                    _hold(promise, "preserves computation", _same, before, after)
            return result

        CONTRACTS[promise.name] = promise
        return run  # type: ignore[return-value]

    return declare


def seeded_call(module: Callable[..., Any], inputs: Mapping[str, torch.Tensor]) -> Any:
    """``module(**inputs)`` with the random generator at a fixed seed (and left as it was),
    so that two graphs that draw the same dropout masks in the same order compare equal."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return module(**inputs)


def _hold(promise: Contract, what: str, check: Check | None, *args: Any) -> None:
    problem = check(*args) if check is not None else None
    if problem is not None:
        raise ContractError(f"passes.{promise.name} broke its contract ({what}): {problem}")


def _same(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    """None when ``after`` holds ``before``'s tensors to a relative :data:`TOLERANCE`."""
    for name, want in before.items():
        if not isinstance(want, torch.Tensor):
            continue
        got = after.get(name) if isinstance(after, Mapping) else None
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return f"output {name!r} is {_describe(got)}, was {_describe(want)}"
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not error <= TOLERANCE:
            return f"output {name!r} changed by a relative {error:.2e}"
    return None


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "missing" if value is None else type(value).__name__
