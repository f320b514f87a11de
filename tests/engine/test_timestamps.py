"""`parse_segments`: Whisper's timestamp tokens → timed segments, on the real Whisper tokenizer
(the multilingual test checkpoint's, built from OpenAI's BPE ranks) with constructed token
sequences; and on random pair-structured sequences, against transformers' own reading of
timestamp tokens (`WhisperTokenizer._compute_offsets`, OpenAI's `transcribe.py` rule)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from service.engine.timestamps import TimedSegment, parse_segments


@pytest.fixture(scope="module")
def tok(checkpoints: dict[str, Path]) -> Any:
    return AutoTokenizer.from_pretrained(checkpoints["whisper"])


class Words:
    """Token ids of text and of `<|x.xx|>` on the real tokenizer."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.begin = int(tok.convert_tokens_to_ids("<|0.00|>"))
        self.first_special = int(tok.convert_tokens_to_ids("<|endoftext|>"))

    def t(self, seconds: float) -> int:
        token = self.begin + round(seconds / 0.02)
        assert self.tok.convert_ids_to_tokens(token) == f"<|{seconds:.2f}|>"  # a real one
        return token

    def text(self, words: str) -> list[int]:
        return list(self.tok.encode(words, add_special_tokens=False))

    def parse(self, ids: list[int], **kw: Any) -> list[TimedSegment]:
        return parse_segments(
            ids,
            timestamp_begin=self.begin,
            first_special=self.first_special,
            decode=lambda t: str(self.tok.decode(t, skip_special_tokens=True)),
            **kw,
        )


@pytest.fixture(scope="module")
def w(tok: Any) -> Words:
    return Words(tok)


def spans(segments: list[TimedSegment]) -> list[tuple[float, float | None, str]]:
    return [(s.start, s.end, s.text) for s in segments]


def test_pairs_of_timestamps_delimit_segments(w: Words) -> None:
    ids = [
        w.t(0.0),
        *w.text(" Hello world."),
        w.t(1.24),
        w.t(1.24),
        *w.text(" How are you?"),
        w.t(2.8),
        w.t(3.1),  # a pause from 2.80 to 3.10 s: the later timestamp starts the next
        *w.text(" Fine."),
        w.t(3.9),
    ]
    assert spans(w.parse(ids)) == [
        (0.0, 1.24, "Hello world."),
        (1.24, 2.8, "How are you?"),
        (3.1, 3.9, "Fine."),
    ]
    # the segments' tokens are the text tokens, in order, with nothing of the timestamps
    parsed = w.parse(ids)
    assert [t for s in parsed for t in s.tokens] == [t for t in ids if t < w.begin]


def test_single_timestamps_end_of_text_and_a_cut_tail(w: Words) -> None:
    eot = int(w.tok.convert_tokens_to_ids("<|endoftext|>"))
    ids = [
        w.t(0.5),
        *w.text(" one"),
        w.t(1.0),  # one timestamp between two segments: the end of one, the start of the next
        *w.text(" two"),
        w.t(2.0),
        eot,  # specials are skipped (the caller cuts at end of text; this one is ignored)
        w.t(2.0),
        *w.text(" three four"),  # max_new_tokens stopped decoding here: no end of its own
    ]
    assert spans(w.parse(ids)) == [
        (0.5, 1.0, "one"),
        (1.0, 2.0, "two"),
        (2.0, None, "three four"),
    ]


def test_text_before_any_timestamp_starts_at_zero_and_scores_follow_their_tokens(
    w: Words,
) -> None:
    lang = int(w.tok.convert_tokens_to_ids("<|de|>"))
    head, tail = w.text(" guten"), w.text(" Tag")
    ids = [*head, lang, w.t(0.8), w.t(0.9), *tail, w.t(1.5), w.t(1.5)]
    scores = [-0.1 * (i + 1) for i in range(len(ids))]
    parsed = w.parse(ids, logprobs=scores)
    assert spans(parsed) == [(0.0, 0.8, "guten"), (0.9, 1.5, "Tag")]
    assert parsed[0].logprobs == scores[: len(head)]
    start = len(head) + 3
    assert parsed[1].logprobs == scores[start : start + len(tail)]
    assert w.parse([w.t(0.0), w.t(0.0), w.t(1.0)]) == []  # timestamps alone: no segment
    assert w.parse([]) == []


def random_sequences(w: Words, count: int) -> Iterator[list[int]]:
    """What Whisper's timestamp rules let a model write: increasing timestamps in pairs
    around text, a lone one only at the very end."""
    rng = np.random.default_rng(7)
    vocab = ["yes", "no", "turn", "on", "the", "lights", "three", "four", "call", "home"]
    for _ in range(count):
        now, ids = 0.0, []
        for _segment in range(int(rng.integers(1, 5))):
            start = now + 0.02 * int(rng.integers(0, 20))
            end = start + 0.02 * int(rng.integers(1, 80))
            if end > 30.0:
                break
            words = " " + " ".join(rng.choice(vocab, int(rng.integers(1, 4))))
            ids += [w.t(round(start, 2)), *w.text(words), w.t(round(end, 2))]
            now = end
        yield ids


def test_agrees_with_transformers_on_what_the_rules_let_a_model_write(
    w: Words, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers reads timestamps as every id after `all_special_ids[-1]`; the test
    # tokenizer registers only <|endoftext|> as special, so the list is given its real last
    # special token, <|notimestamps|> (as in openai/whisper-* tokenizers)
    specials = [w.first_special, w.begin - 1]
    monkeypatch.setattr(type(tok), "all_special_ids", property(lambda self: specials))
    checked = 0
    for ids in random_sequences(w, 60):
        if not ids:
            continue
        expected = [
            # its times are float products (3.3200000000000003): to the 0.02 s grid
            (round(o["timestamp"][0], 2), round(o["timestamp"][1], 2), o["text"].strip())
            for o in tok._compute_offsets(ids)
        ]
        assert spans(w.parse(ids)) == expected, tok.convert_ids_to_tokens(ids)
        checked += 1
    assert checked >= 50
