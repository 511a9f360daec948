"""The live dashboard: redraws ``render(snapshot)`` in a Rich `Live` at the manifest's
``dashboard.refresh_hz``, from the event loop (STYLE.md, "Dashboard")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rich.console import Console, RenderableType
from rich.live import Live

from orchestrator.ui.render import render
from orchestrator.ui.snapshot import RunSnapshot


class LiveDashboard:
    """Redraws `render(snapshot_fn())` at `refresh_hz` from the event loop, so Rich's own refresh
    thread (disabled here) never reads state that the engine is mutating."""

    def __init__(
        self, console: Console, refresh_hz: float, snapshot_fn: Callable[[], RunSnapshot]
    ) -> None:
        if not refresh_hz > 0:
            raise ValueError(f"refresh_hz must be > 0, got {refresh_hz!r}")
        self.console = console
        self.period_s = 1.0 / refresh_hz
        self.snapshot_fn = snapshot_fn

    def _frame(self) -> RenderableType:
        return render(self.snapshot_fn(), self.console.width, self.console.height)

    async def run(self, stop: asyncio.Event) -> None:
        """Redraw until `stop` is set, then draw one last frame and return.

        Cancelling is safe: the `Live` context restores the terminal on the way out.
        """
        live = Live(console=self.console, auto_refresh=False, screen=False, transient=False)
        with live:
            while not stop.is_set():
                live.update(self._frame(), refresh=True)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.period_s)
                except asyncio.TimeoutError:
                    pass
            live.update(self._frame(), refresh=True)
