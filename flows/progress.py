"""Progress lines for long stage work: ``embed: 120,000/6,500,000 frames (1.8%), 950/s, ETA 1:51:54``.

Logged (not a terminal bar) because stages run under dvc repro and Prefect, whose logs are
files and a server: a line every ``every_s`` seconds, and one at the end with the total
time. The logger is ``flows.<stage>``; flows.runtime makes Prefect show the ``flows``
loggers beside its own.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable


def _clock_text(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Counts finished units of one stage's work and logs rate and ETA now and then."""

    def __init__(self, stage: str, total: int | None, *, unit: str = "frames", every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.unit, self.every_s, self.clock = stage, total, unit, every_s, clock
        self.logger = logging.getLogger(f"flows.{stage}")
        self.done = 0
        self.start = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.stage}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.1f}%), {rate:,.1f}/s"
            if rate > 0 and self.done < self.total:
                text += f", ETA {_clock_text((self.total - self.done) / rate)}"
        else:
            text += f" {self.unit}, {rate:,.1f}/s"
        return text

    def close(self) -> float:
        """Log the final line with the elapsed time; return the elapsed seconds."""
        now = self.clock()
        self.logger.info(f"{self.line(now)} in {_clock_text(now - self.start)}")
        return now - self.start


__all__ = ["Progress"]
