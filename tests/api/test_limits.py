"""Every request limit at its boundary: just under passes, just over gets the documented error."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.api.app import create_app
from tests.conftest import LiveServer, encode, settings_for

TRANSCRIBE = "/v1/audio/transcriptions"
LIMITS = {
    "max_upload_bytes": 1_000_000,
    "max_audio_seconds": 20.0,
    "max_new_tokens": 16,
    "max_num_beams": 2,
    "max_prompt_chars": 100,
}


@pytest.fixture(scope="module")
def limited(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    settings = settings_for(checkpoints["wav2vec2-bert"], **LIMITS)
    with LiveServer(create_app(settings)) as server:
        yield server


def clip(seconds: float, subtype: str = "PCM_16") -> bytes:
    rng = np.random.default_rng(0)
    return encode(
        rng.normal(0, 0.05, int(seconds * 16_000)).astype(np.float32), 16_000, "WAV", subtype
    )


def post(server: LiveServer, audio: bytes, **fields: object) -> httpx.Response:
    data = {k: str(v) for k, v in fields.items()}
    return httpx.post(
        server.url + TRANSCRIBE, files={"file": ("a.wav", audio)}, data=data, timeout=60
    )


def check(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code


def test_upload_bytes(limited: LiveServer) -> None:
    # 64-bit float WAV: big files of short audio, so only the byte limit is in play
    under, over = clip(7.7, "DOUBLE"), clip(7.9, "DOUBLE")
    assert len(under) < 1_000_000 - 1000 < 1_000_000 < len(over)
    check(post(limited, under), 200)
    check(post(limited, over), 413, "too_large")


def test_audio_seconds(limited: LiveServer) -> None:
    check(post(limited, clip(19.9)), 200)
    check(post(limited, clip(20.2)), 413, "too_large")


@pytest.mark.parametrize(
    ("field", "at_limit", "over"),
    [
        ("max_new_tokens", 16, 17),
        ("num_beams", 2, 3),
    ],
)
def test_generation_caps(limited: LiveServer, field: str, at_limit: object, over: object) -> None:
    audio = clip(1.0)
    check(post(limited, audio, **{field: at_limit}), 200)
    response = post(limited, audio, **{field: over})
    check(response, 400, "invalid_value")
    assert response.json()["error"]["param"] == field


def test_prompt_cap_then_prompt_support(limited: LiveServer) -> None:
    # over STT_MAX_PROMPT_CHARS: invalid whatever the model; at the cap, this model (no prompt
    # input: not Whisper) refuses it by name rather than ignoring it
    over = post(limited, clip(1.0), prompt="p" * 101)
    check(over, 400, "invalid_value")
    assert over.json()["error"]["param"] == "prompt"
    at_cap = post(limited, clip(1.0), prompt="p" * 100)
    check(at_cap, 400, "unsupported")
    assert at_cap.json()["error"]["param"] == "prompt"


def test_model_names_never_reach_the_filesystem(limited: LiveServer) -> None:
    for name in ("../../etc/passwd", "/tmp", "model_store/w2v2-bert-commands-en", "tiny/.."):
        check(post(limited, clip(1.0), model=name), 404, "model_not_found")
    check(post(limited, clip(1.0), model="tiny"), 200)
