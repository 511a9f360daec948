"""The rounds' frozen heap is handed back to the collector when the block ends, error or not."""

from __future__ import annotations

import gc

import pytest

from orchestrator.heap import long_lived_frozen


def test_frozen_inside_and_unfrozen_after() -> None:
    assert gc.get_freeze_count() == 0
    with long_lived_frozen() as freeze:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        later = [[k] for k in range(1000)]  # new containers, tracked by the collector
        freeze()
        assert gc.get_freeze_count() >= frozen + len(later)
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), long_lived_frozen():
        raise RuntimeError("a failed run")
    assert gc.get_freeze_count() == 0
