"""The bundled model's domain: spoken digit strings and short voice commands.

The grammar is small on purpose (a closed vocabulary of 56 words) so that a model trained from
scratch on two CPU cores in about an hour reaches a low word error rate on unseen voices. Every
sentence the grammar produces uses only `VOCABULARY`, which becomes the tokenizer's vocabulary.
"""

import random

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DEVICES = ("lights", "fan", "heater", "radio", "music")
_ROOMS = ("kitchen", "bedroom", "garage", "office")
_OPENABLE = ("door", "window", "garage")
_SINGLE = ("stop", "pause", "resume", "cancel", "yes", "no", "next", "back", "help")
_DIRECTIONS = ("up", "down", "left", "right", "forward", "back")
_CONTACTS = ("mom", "dad", "home", "office")


def _digit_string(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 5)))


def _command(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        text = f"turn {rng.choice(('on', 'off'))} the {rng.choice(_DEVICES)}"
        if rng.random() < 0.4:
            text += f" in the {rng.choice(_ROOMS)}"
        return text
    if kind == 1:
        return f"{rng.choice(('open', 'close'))} the {rng.choice(_OPENABLE)}"
    if kind == 2:
        return rng.choice(("play music", "play the news", "play the radio"))
    if kind == 3:
        return rng.choice(_SINGLE)
    if kind == 4:
        return f"go {rng.choice(_DIRECTIONS)}"
    if kind == 5:
        return f"call {rng.choice(_CONTACTS)}"
    if kind == 6:
        return f"set volume to {rng.choice(DIGITS)}"
    return f"set a timer for {rng.choice(DIGITS)} minutes"


def sentence(rng: random.Random) -> str:
    """One utterance of the domain: half digit strings, half commands."""
    return _digit_string(rng) if rng.random() < 0.5 else _command(rng)


def _vocabulary() -> tuple[str, ...]:
    words = set(DIGITS) | set(_DEVICES) | set(_ROOMS) | set(_OPENABLE) | set(_SINGLE)
    words |= set(_DIRECTIONS) | set(_CONTACTS)
    words |= {"turn", "on", "off", "the", "in", "open", "close", "play", "news", "go", "call"}
    words |= {"set", "volume", "to", "a", "timer", "for", "minutes"}
    return tuple(sorted(words))


VOCABULARY = _vocabulary()
