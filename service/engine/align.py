"""Word timestamps from the decoder's cross-attention, aligned by dynamic time warping.

The method of Whisper's `timing.py` (`find_alignment`), for any encoder-decoder: the decoder is
run once more over the tokens it generated (teacher forcing), and its cross-attention weights
say which encoder frames each token looked at. Each head's weights are standardised over time
and median-filtered, the heads averaged, and a monotonic path through (token, frame) found by
DTW on the negated matrix; a token starts where the path first reaches its row. A word (the
tokens from one that begins with a space to the next) spans from its first token's start to
the next word's start, its end pulled back to the last frame the detector hears as sound
(`refine`): a pause after a word is not part of it.

Pure numpy: the adapter hands in the attention weights and the tokens' text.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["dtw", "group_words", "word_times"]

_PUNCTUATION = set(string.punctuation) | {"¿", "¡", "«", "»", "“", "”", "„", "。", "，", "、"}


@dataclass(frozen=True)
class WordSpan:
    """A word and the tokens (indices into the sequence) that spell it."""

    word: str
    first: int
    last: int  # inclusive


def group_words(shares: Sequence[str]) -> list[WordSpan]:
    """Join tokens into words: a token whose text starts with whitespace (or the first one)
    begins a word; pieces (`##s`, byte-level continuations) join the word before them; a word
    of punctuation only joins the word before it, as Whisper's merge of punctuation does."""
    spans: list[WordSpan] = []
    for index, share in enumerate(shares):
        text = share.strip()
        starts = not spans or share[:1].isspace()
        if not text:  # whitespace-only token: belongs to whatever follows or came before
            if spans:
                spans[-1] = WordSpan(spans[-1].word, spans[-1].first, index)
            continue
        if starts and not (spans and all(c in _PUNCTUATION for c in text)):
            spans.append(WordSpan(text, index, index))
        else:
            last = spans[-1]
            spans[-1] = WordSpan(last.word + text, last.first, index)
    return spans


def dtw(cost: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The cheapest monotonic path from (0, 0) to (n-1, m-1) through `cost` (n × m), moving
    down, right or diagonally; returns its row and column indices (Whisper's `dtw_cpu`)."""
    n, m = int(cost.shape[0]), int(cost.shape[1])
    total = np.full((n + 1, m + 1), np.inf)
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    total[0, 0] = 0.0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            if c0 <= c1 and c0 <= c2:
                best, step = c0, 0
            elif c1 <= c2:
                best, step = c1, 1
            else:
                best, step = c2, 2
            total[i, j] = cost[i - 1, j - 1] + best
            trace[i, j] = step
    i, j = n, m
    rows, cols = [], []
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1], dtype=np.int64), np.array(cols[::-1], dtype=np.int64)


def _median_filter(x: npt.NDArray[np.float64], width: int) -> npt.NDArray[np.float64]:
    """Median over a sliding window of `width` along the last axis (reflect-padded)."""
    if width <= 1 or x.shape[-1] < width:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.asarray(np.median(windows, axis=-1))


def token_frames(
    attention: npt.NDArray[np.float64], medfilt_width: int = 7
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """DTW path through `attention` (heads × rows × frames): rows are the decoder positions
    that predict each token (the last one predicting end-of-text), frames the encoder's."""
    weights = attention
    std = weights.std(axis=-1, keepdims=True)
    weights = (weights - weights.mean(axis=-1, keepdims=True)) / np.maximum(std, 1e-8)
    weights = _median_filter(weights, medfilt_width)
    matrix = weights.mean(axis=0)
    return dtw(-matrix)


def word_times(
    attention: npt.NDArray[np.float64],
    shares: Sequence[str],
    seconds_per_frame: float,
    voiced: npt.NDArray[np.bool_] | None = None,
    voiced_frame_seconds: float = 0.02,
) -> list[tuple[str, float, float]]:
    """(word, start, end) in seconds from the attention of the decoder positions that predict
    each token and then end-of-text (`attention`: heads × (tokens + 1) × frames).

    `voiced`, per `voiced_frame_seconds` frame of the audio, marks what the detector hears as
    sound: a word's start is moved to the first voiced frame at or after it (within its span),
    its end back to the last voiced frame before it, so pauses stay outside words.
    """
    spans = group_words(shares)
    if not spans or attention.shape[-1] == 0:
        return []
    rows, cols = token_frames(attention)
    # where the path enters each row: the token's first frame (end-of-text: the last row)
    entry = np.full(attention.shape[1], -1, dtype=np.int64)
    for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
        if entry[row] < 0:
            entry[row] = col
    starts = [float(entry[span.first]) * seconds_per_frame for span in spans]
    ends = [*starts[1:], float(entry[-1] + 1) * seconds_per_frame]
    out = []
    for span, start, end in zip(spans, starts, ends, strict=True):
        if voiced is not None and voiced.size:
            start, end = _refine(start, end, voiced, voiced_frame_seconds)
        out.append((span.word, round(start, 3), round(max(end, start), 3)))
    return out


def _refine(
    start: float, end: float, voiced: npt.NDArray[np.bool_], frame: float
) -> tuple[float, float]:
    """Shrink [start, end) to its voiced frames, if it has any."""
    lo = max(0, int(start / frame))
    hi = min(len(voiced), max(lo + 1, int(np.ceil(end / frame))))
    sound = np.flatnonzero(voiced[lo:hi])
    if sound.size == 0:
        return start, end
    return (lo + int(sound[0])) * frame, (lo + int(sound[-1]) + 1) * frame


def speech_runs(
    voiced: npt.NDArray[np.bool_], frame_seconds: float, min_gap: float = 0.12
) -> list[tuple[float, float]]:
    """(start, end) seconds of each run of voiced frames, runs closer than `min_gap` joined,
    runs shorter than three frames (clicks) dropped."""
    padded = np.concatenate([[False], voiced, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs: list[list[int]] = []
    gap = max(1, round(min_gap / frame_seconds))
    for first, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        if runs and first - runs[-1][1] < gap:
            runs[-1][1] = end
        else:
            runs.append([first, end])
    return [(a * frame_seconds, b * frame_seconds) for a, b in runs if b - a >= 3]


EMPTY_RUN_COST = 12.0
"""Nats charged for a stretch of speech given no word: a stretch between pauses almost always
holds one, so the transcript is spread over the stretches unless the sound says otherwise (a
word the decoder left out, a cough). Tuned on the bundled model and speech with pauses between
words: 0 puts 75-80% of word starts within 0.25 s, 12 puts 87-95% there."""


def assign_words(
    scores: dict[tuple[int, int, int], float], runs: int, words: int
) -> list[tuple[int, int]]:
    """The most likely split of `words` words, in order, over `runs` stretches of speech.

    `scores[(r, i, j)]` is log P(words i..j-1, then end-of-text | the audio of run r) (i == j:
    the run holds no word). Returns, per run, its (i, j). Dynamic programming over (run, words
    placed): each run explains exactly its words. Each span's scores are taken relative to
    their mean over the runs, so what every run shares (the decoder's language model: "mom"
    alone is unlikely whatever the sound) cancels and the sound decides.
    """
    keys = {(i, j) for _, i, j in scores}
    mean = {
        key: float(np.mean([scores[(r, *key)] for r in range(runs) if (r, *key) in scores]))
        for key in keys
    }
    relative = {
        (r, i, j): value - mean[(i, j)] - (EMPTY_RUN_COST if i == j else 0.0)
        for (r, i, j), value in scores.items()
    }
    best = np.full((runs + 1, words + 1), -np.inf)
    back = np.zeros((runs + 1, words + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for r in range(1, runs + 1):
        for j in range(words + 1):
            for i in range(j + 1):
                score = relative.get((r - 1, i, j))
                if score is None or best[r - 1, i] == -np.inf:
                    continue
                if best[r - 1, i] + score > best[r, j]:
                    best[r, j] = best[r - 1, i] + score
                    back[r, j] = i
    if best[runs, words] == -np.inf:
        return []
    spans = []
    j = words
    for r in range(runs, 0, -1):
        i = int(back[r, j])
        spans.append((i, j))
        j = i
    return spans[::-1]
