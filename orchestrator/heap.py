"""Keeping the garbage collector's full collections short during the rounds.

A full (generation 2) collection walks every tracked object in the process: torch's modules and
functions, the dataset's wrappers, and every connection's websockets and asyncio objects. With a
thousand devices one such walk took up to 325 ms on the event-loop thread, during which no
keepalive is answered (``bench.scale``). What exists when the rounds start lives until the run
ends, so it is moved out of the collector's sight (:func:`gc.freeze`: once the job is ready,
again once the fleet has joined) and handed back afterwards, so that a process that runs many
engines (the tests) frees each run's objects.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[Callable[[], None]]:
    """Freeze the heap as it stands; the block may freeze what it has added since by calling
    what it is given. Everything is unfrozen on the way out."""
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()
