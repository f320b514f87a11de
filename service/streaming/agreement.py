"""Decide which words of a growing utterance's transcript are final: LocalAgreement-2.

While an utterance is still being spoken, the service re-transcribes its audio so far every
little while. Each new hypothesis may rewrite its last words; a word is committed (shown to the
client as final, never taken back) once two consecutive hypotheses agree on it. This is the
LocalAgreement-n policy with n = 2 of Macháček, Dabre and Bojar, "Turning Whisper into Real-Time
Transcription System" (IJCNLP-AACL 2023 demo, https://arxiv.org/abs/2307.14743), the policy of
whisper_streaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Hypothesis", "LocalAgreement"]


@dataclass(frozen=True)
class Hypothesis:
    """The transcript of the open utterance: `committed` words are final, `tail` may change."""

    committed: tuple[str, ...]
    tail: tuple[str, ...]

    @property
    def committed_text(self) -> str:
        """The committed words joined by single spaces."""
        return " ".join(self.committed)

    @property
    def tail_text(self) -> str:
        """The uncommitted words joined by single spaces."""
        return " ".join(self.tail)

    @property
    def text(self) -> str:
        """The whole hypothesis: committed words, then the tail."""
        return " ".join((*self.committed, *self.tail))


class LocalAgreement:
    """LocalAgreement-2 over the words of successive hypotheses of one utterance.

    Words are compared as exact strings, by position. On each `update`, the words past the
    committed ones that the previous and the current hypothesis share as a common prefix are
    committed. Committed words never change: a hypothesis that disagrees with them does not
    undo them, and its words from position len(committed) on are the tail. (whisper_streaming
    aligns hypotheses by word timestamps instead; positions are what a model without timestamps
    offers, and they line up since each hypothesis transcribes the same audio plus a little more.)

    Example: the hypotheses "turn", "turn of", "turn on the", "turn on the lights" commit "turn"
    at the second update and "on the" at the fourth, whose tail is then "lights".
    """

    def __init__(self) -> None:
        self._committed: list[str] = []
        self._previous: tuple[str, ...] | None = None

    def update(self, words: Sequence[str]) -> Hypothesis:
        """Take the next hypothesis of the utterance; return what is committed and what is not."""
        current = tuple(words)
        n = len(self._committed)
        if self._previous is not None:
            agreed = _common_prefix_length(self._previous[n:], current[n:])
            self._committed.extend(current[n : n + agreed])
        self._previous = current
        return Hypothesis(tuple(self._committed), current[len(self._committed) :])

    def reset(self) -> None:
        """Forget the utterance: the next `update` starts a new one with nothing committed."""
        self._committed.clear()
        self._previous = None


def _common_prefix_length(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading words `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
