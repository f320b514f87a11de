"""Admission by the audio accepted uploads hold: decoded seconds in flight, across requests.

The queue limits count windows waiting for a worker; an upload holds its whole decoded signal
from decoding until its last window is done (an hour at 16 kHz is 230 MB of float32). Ten
uploads of a 2.4 MB FLAC that decodes to an hour took 1.6 GB within 40 s while the queue
limits saw only their first windows. Each upload reserves its header's duration before it is
decoded, trues it up once decoded, and releases it when its answer is done; a reservation that
does not fit is a 429 with `Retry-After`. A reservation also lapses a little after its
request's deadline, so a path that forgets to release (a stream whose client vanished before
its first byte) cannot shrink the budget for good. Used from the event loop only.
"""

import time
from collections.abc import Callable

from service.errors import Overloaded

LAPSE_AFTER_DEADLINE_S = 5.0


class Reservation:
    """One upload's share of the budget; `release` is idempotent."""

    def __init__(self, budget: "AudioBudget", seconds: float, expires_at: float) -> None:
        self.budget = budget
        self.seconds = seconds
        self.expires_at = expires_at

    def resize(self, seconds: float) -> None:
        """The decoded duration, now known (may differ from the header's)."""
        self.seconds = seconds
        self.budget.changed()

    def release(self) -> None:
        self.budget.drop(self)


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
        self.drain_rate = drain_rate  # audio s per s the engine gets through (0: unknown)
        self.on_change = on_change
        self._live: set[Reservation] = set()

    @property
    def held(self) -> float:
        return sum(r.seconds for r in self._live)

    def reserve(self, seconds: float, deadline: float) -> Reservation:
        """Reserve `seconds` for a request due by `deadline` (monotonic) or raise `Overloaded`."""
        now = time.monotonic()
        for lapsed in [r for r in self._live if r.expires_at <= now]:
            self._live.discard(lapsed)
        held = self.held
        if held > 0 and held + seconds > self.limit:
            rate = self.drain_rate()
            wait = (held + seconds - self.limit) / rate if rate > 0 else 1.0
            raise Overloaded(
                f"{held:.0f} s of audio are being transcribed; this upload's {seconds:.0f} s "
                f"would pass the limit of {self.limit:g} s",
                retry_after=min(max(1.0, wait), 600.0),
                code="audio_in_flight",
            )
        reservation = Reservation(self, seconds, deadline + LAPSE_AFTER_DEADLINE_S)
        self._live.add(reservation)
        self.changed()
        return reservation

    def drop(self, reservation: Reservation) -> None:
        self._live.discard(reservation)
        self.changed()

    def changed(self) -> None:
        self.on_change(self.held)
