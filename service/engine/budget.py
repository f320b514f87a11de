"""Admission by the audio accepted uploads hold: decoded seconds in flight, across requests.

The queue limits count windows waiting for a worker; an upload holds its whole decoded signal
from decoding until its last window is done (an hour at 16 kHz is 230 MB of float32). Ten
uploads of a 2.4 MB FLAC that decodes to an hour took 1.6 GB within 40 s while the queue
limits saw only their first windows. Each upload reserves its header's duration before it is
decoded, trues it up once decoded, and releases it when its answer is done; a reservation that
does not fit is a 429 with `Retry-After`. Used from the event loop only.
"""

from collections.abc import Callable

from service.errors import Overloaded

BYTES_PER_SECOND = 4 * 16_000
"""Memory of one decoded second (float32 at 16 kHz), for the documentation's memory bound."""


class Reservation:
    """One upload's share of the budget; `release` is idempotent."""

    def __init__(self, budget: "AudioBudget", seconds: float) -> None:
        self.budget = budget
        self.seconds = seconds

    def resize(self, seconds: float) -> None:
        """The decoded duration, now known (may differ from the header's)."""
        self.budget.held += seconds - self.seconds
        self.seconds = seconds

    def release(self) -> None:
        self.budget.held -= self.seconds
        self.seconds = 0.0


class AudioBudget:
    """At most `limit_seconds` of decoded upload audio held by accepted requests at once.

    One upload is always admitted when nothing is held, so no valid upload is refused for ever
    (the bound is then the larger of the limit and `max_audio_seconds`).
    """

    def __init__(
        self,
        limit_seconds: float,
        drain_rate: Callable[[], float],
        on_change: Callable[[float], None] = lambda held: None,
    ) -> None:
        self.limit = limit_seconds
        self._held = 0.0
        self.drain_rate = drain_rate  # audio s per s the engine gets through (0: unknown)
        self.on_change = on_change

    @property
    def held(self) -> float:
        return self._held

    @held.setter
    def held(self, value: float) -> None:
        self._held = max(0.0, value)
        self.on_change(self._held)

    def reserve(self, seconds: float) -> Reservation:
        if self.held > 0 and self.held + seconds > self.limit:
            rate = self.drain_rate()
            wait = (self.held + seconds - self.limit) / rate if rate > 0 else 1.0
            raise Overloaded(
                f"{self.held:.0f} s of audio are being transcribed; this upload's {seconds:.0f} s "
                f"would pass the limit of {self.limit:g} s",
                retry_after=min(max(1.0, wait), 600.0),
                code="audio_in_flight",
            )
        self.held += seconds
        return Reservation(self, seconds)
