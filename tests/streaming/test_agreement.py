"""LocalAgreement-2: a word is committed once two consecutive hypotheses agree on it."""

import random

from service.streaming.agreement import Hypothesis, LocalAgreement


def updates(*texts: str) -> list[Hypothesis]:
    agreement = LocalAgreement()
    return [agreement.update(text.split()) for text in texts]


def test_a_growing_transcript() -> None:
    steps = updates("turn", "turn of", "turn on the", "turn on the lights", "turn on the lights")
    assert [(h.committed_text, h.tail_text) for h in steps] == [
        ("", "turn"),  # one hypothesis agrees with nothing yet
        ("turn", "of"),
        ("turn", "on the"),  # "of" was not confirmed, so nothing was lost
        ("turn on the", "lights"),
        ("turn on the lights", ""),
    ]
    assert steps[3].text == "turn on the lights"
    assert steps[3] == Hypothesis(committed=("turn", "on", "the"), tail=("lights",))


def test_committed_words_survive_a_disagreeing_hypothesis() -> None:
    steps = updates(
        "set a timer", "set a timer for", "set the timer for five", "set a timer for five"
    )
    assert steps[1].committed == ("set", "a", "timer")
    # the third says "the" where "a" is committed: "a" stays, and "for", on which the second
    # and third agree, is committed after it; the tail is the third's words past those
    assert steps[2].committed == ("set", "a", "timer", "for")
    assert steps[2].tail == ("five",)
    assert steps[2].text == "set a timer for five"
    assert steps[3].committed == ("set", "a", "timer", "for", "five")


def test_agreement_is_judged_past_the_committed_words() -> None:
    steps = updates("a b", "a b c d", "a x c d e", "a y c d e f")
    assert steps[1].committed == ("a", "b")
    # positions 2.. agree ("c d") even though position 1 changed: they are committed
    assert steps[2].committed == ("a", "b", "c", "d")
    assert steps[2].tail == ("e",)
    assert steps[3].committed == ("a", "b", "c", "d", "e")
    assert steps[3].tail == ("f",)


def test_shorter_and_empty_hypotheses() -> None:
    steps = updates("play music", "play music now", "play", "", "play music now please")
    assert steps[1].committed == ("play", "music")
    assert steps[2] == Hypothesis(("play", "music"), ())
    assert steps[3] == Hypothesis(("play", "music"), ())
    assert steps[4] == Hypothesis(("play", "music"), ("now", "please"))
    assert Hypothesis((), ()).text == ""


def test_reset_starts_a_new_utterance() -> None:
    agreement = LocalAgreement()
    agreement.update(["open", "the", "door"])
    assert agreement.update(["open", "the", "door"]).committed == ("open", "the", "door")
    agreement.reset()
    first = agreement.update(["close", "it"])
    assert first == Hypothesis((), ("close", "it"))
    assert agreement.update(["close", "it"]).committed == ("close", "it")


def test_random_hypotheses_commit_only_agreed_words_and_never_take_one_back() -> None:
    vocabulary = ["on", "off", "the", "a", "light", "lights", "door", "turn", "open"]
    for seed in range(300):
        rng = random.Random(seed)
        agreement = LocalAgreement()
        truth = [rng.choice(vocabulary) for _ in range(12)]
        previous: tuple[str, ...] | None = None
        committed: tuple[str, ...] = ()
        for _ in range(rng.randint(1, 15)):
            # a prefix of the truth, with some words changed, dropped or added at random
            words = truth[: rng.randint(0, len(truth))]
            for _ in range(rng.randint(0, 3)):
                i = rng.randint(0, len(words))
                op = rng.choice(("change", "drop", "add"))
                if op == "add" or not words:
                    words.insert(i, rng.choice(vocabulary))
                elif op == "drop":
                    del words[min(i, len(words) - 1)]
                else:
                    words[min(i, len(words) - 1)] = rng.choice(vocabulary)
            hypothesis = agreement.update(words)
            # committed words only grow, and never change
            assert hypothesis.committed[: len(committed)] == committed
            new = hypothesis.committed[len(committed) :]
            n = len(committed)
            if new:  # newly committed words are in both this hypothesis and the previous one
                assert previous is not None
                assert tuple(words[n : n + len(new)]) == new
                assert previous[n : n + len(new)] == new
            # whatever the two agree on past the committed words is committed
            if previous is not None:
                following = n + len(new)
                assert (
                    following >= len(words)
                    or following >= len(previous)
                    or (words[following] != previous[following])
                )
            assert hypothesis.tail == tuple(words[len(hypothesis.committed) :])
            assert hypothesis.text == " ".join((*hypothesis.committed, *hypothesis.tail))
            committed = hypothesis.committed
            previous = tuple(words)
