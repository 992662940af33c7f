"""The pipeline's one interface: a stage after decoding (enrich, track, print, export).

Every package's stages derive from Stage; tracer.Tracer runs them in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tcptrace.kernel.events import Event
    from tcptrace.kernel.stats import Summary


class Stage:
    """One step after decoding: enrich, track, print or export. Override what you need.

    Stages run in order on each batch; a stage may replace events (enrichment)
    by returning a new list, or return None to pass the batch on unchanged.
    """

    def on_start(self) -> None:
        """The program is attached; nothing has been read yet."""

    def on_events(self, events: list[Event]) -> list[Event] | None:
        return None

    def on_tick(self, now_ns: int) -> list[Event] | None:
        """Called at least every POLL_MS, events or not (monotonic clock).

        Events returned here (for example transitions found by polling) go to
        the stages after this one, as a batch of their own.
        """
        return None

    def on_drained(self, now_ns: int) -> list[Event] | None:
        """The kernel side is detached and every buffered event was handed on: a last
        look at what polling follows (events returned go on as from on_tick)."""
        return None

    def on_finish(self, summary: Summary) -> None:
        """Tracing stopped; summary holds the kernel's exact statistics.

        A stage may add to it (states the kernel cannot see); later stages see that.
        """
