"""One strategy object guides one pipeline call at a time: the claim that enforces it.

A strategy keeps per-call state (momentum, switches, histories), so two pipelines (or threads) sharing one object
would mix their states silently; `claim` refuses the second call instead. Apart from the hook because it is
process-wide state, not the state of one handle.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from guidance.base import GuidanceStrategy

# Strategies with a pipeline call in progress, by id -> which pipeline and thread holds them.
_STRATEGIES_IN_USE: dict[int, str] = {}
_IN_USE_LOCK = threading.Lock()


def strategy_tree(strategy: GuidanceStrategy) -> list[GuidanceStrategy]:
    """The strategy and every strategy it wraps (Interval's inner, ...), depth first."""
    return [strategy] + [s for child in strategy.wrapped_strategies() for s in strategy_tree(child)]


@contextmanager
def claim(strategy: GuidanceStrategy, pipe_name: str):
    """Claim `strategy` (and those it wraps) for one pipeline call; refuse one another call is using."""
    tree = strategy_tree(strategy)
    with _IN_USE_LOCK:
        busy = [s for s in tree if id(s) in _STRATEGIES_IN_USE]
        if busy:
            raise RuntimeError(
                f"{pipe_name}: strategy {busy[0]!r} is guiding another pipeline call right now "
                f"({_STRATEGIES_IN_USE[id(busy[0])]}); a strategy keeps per-call state (momentum, switches), so "
                "one object guides one call at a time: give each pipeline or thread its own strategy "
                "(guidance.from_config(strategy.to_config()) makes a copy)")
        for s in tree:
            _STRATEGIES_IN_USE[id(s)] = f"{pipe_name} in thread {threading.current_thread().name}"
    try:
        yield
    finally:
        with _IN_USE_LOCK:
            for s in tree:
                _STRATEGIES_IN_USE.pop(id(s), None)
