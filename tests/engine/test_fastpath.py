"""Fast paths (service/engine/fastpath.py) on tiny real checkpoints: compiled modules give the
tokens eager ones give, traffic after warm-up compiles nothing new, the compile cache is found
again after a restart, and SDPA attention (transformers' default) matches eager attention."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.engine import fastpath
from service.engine.adapter import ModelAdapter, short_groups
from service.engine.fastpath import FastPath, FastPathOptions
from service.engine.types import GenerationParams
from service.errors import StartupError
from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import CLEAN_EXIT, ServiceProcess, speak

SAMPLES = DEFAULT_MODEL_DIR / "samples"

# beyond warm-up's own lengths, and a short one that runs eagerly by design
LENGTHS = (0.3, 0.9, 1.4, 2.7, 4.4, 6.1, 9.5, 14.0)
PARAMS = GenerationParams(max_new_tokens=6)


def clip(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * 16_000)).astype(np.float32)


def tokens(adapter: ModelAdapter) -> list[list[int]]:
    """Each clip alone, then three of them in one batch (padding, batched decoder)."""
    alone = [adapter.transcribe([clip(s, i)], PARAMS)[0].tokens for i, s in enumerate(LENGTHS)]
    batch = [clip(s, 10 + i) for i, s in enumerate((1.1, 3.3, 5.2))]
    return alone + [row.tokens for row in adapter.transcribe(batch, PARAMS)]


def compiled_matches_eager(model_dir: Path, mode: str) -> None:
    # a fresh compiler per checkpoint (its graphs and guards), so that each checkpoint's own
    # compiles are counted; the compile counter survives the reset (`_count_compiles`)
    torch._dynamo.reset()
    eager = tokens(ModelAdapter(model_dir, "tiny"))
    before = fastpath.stats.compiles
    fast = ModelAdapter(model_dir, "tiny", fast=FastPathOptions(compile=mode))  # type: ignore[arg-type]
    assert fast.fastpath.compiled == (["encoder"] if mode == "encoder" else ["encoder", "decoder"])
    fast.warm_up()
    warmed = fastpath.stats.compiles
    assert warmed > before  # something was compiled
    calls: list[int] = []
    if mode == "all":  # the decoder steps of `generate` really run compiled
        decoder = fast.model.decoder if hasattr(fast.model, "decoder") else fast.model.get_decoder()
        decoder.register_forward_pre_hook(
            lambda _m, _a, kwargs: calls.append(FastPath._decoder_eager((), kwargs)),
            with_kwargs=True,
        )
    assert tokens(fast) == eager
    assert fastpath.stats.compiles == warmed  # every shape served after warm-up was compiled
    if mode == "all":
        assert len(calls) > 1  # the hook saw the steps
        # and none of the steps after a request's first fell back to eager (Whisper's generate
        # makes its first decoder call without a cache object, which runs eagerly by design)
        assert sum(calls) <= len(LENGTHS) + 1  # one generate per clip alone, one batch


@pytest.mark.slow
@pytest.mark.timeout(900)  # compiling: about a minute a checkpoint on an idle 2-core CPU
# one checkpoint per encoder input path: raw samples with a mask (layer norm), raw samples
# without (group norm: exact lengths, no padding), Speech2Text's length-bucketed features,
# Whisper's fixed 30 s; the other kinds share these encoders (CI time: each compiles)
@pytest.mark.parametrize(
    "kind", ["wav2vec2-bert", "wav2vec2-groupnorm-bert", "speech2text", "whisper"]
)
def test_compiled_encoder_keeps_transcripts_without_recompiling(
    checkpoints: dict[str, Path], kind: str
) -> None:
    compiled_matches_eager(checkpoints[kind], "encoder")


@pytest.mark.slow
@pytest.mark.timeout(900)  # compiling: about a minute a checkpoint on an idle 2-core CPU
@pytest.mark.parametrize("kind", ["wav2vec2-bert", "whisper"])
def test_compiled_encoder_and_decoder_keep_transcripts(
    checkpoints: dict[str, Path], kind: str
) -> None:
    compiled_matches_eager(checkpoints[kind], "all")


@pytest.mark.slow
@pytest.mark.timeout(900)  # compiling: about a minute a checkpoint on an idle 2-core CPU
def test_word_timings_and_start_up_probe_run_eagerly(checkpoints: dict[str, Path]) -> None:
    """Calls asking for attention weights, and the start-up probe of tiny inputs, never
    compile a graph of their own."""
    fast = ModelAdapter(
        checkpoints["wav2vec2-bert"], "tiny", fast=FastPathOptions(compile="encoder")
    )
    fast.transcribe([clip(2.0, 1)], PARAMS)  # compiles this length's graph
    compiles, eager_calls = fastpath.stats.compiles, fastpath.stats.eager_calls
    assert fast.min_samples == ModelAdapter(checkpoints["wav2vec2-bert"], "tiny").min_samples
    (row,) = fast.transcribe([clip(2.0, 1)], GenerationParams(max_new_tokens=6, words=True))
    assert row.words
    assert fastpath.stats.compiles == compiles
    assert fastpath.stats.eager_calls > eager_calls


def compile_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stt_compiles_total":
                out["compiles"] = sample.value
            elif sample.name == "stt_compile_cache_lookups_total":
                out[f"{sample.labels['cache']}_{sample.labels['result']}"] = sample.value
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)  # compiling: about a minute a checkpoint on an idle 2-core CPU
def test_a_restart_finds_the_compile_cache(
    checkpoints: dict[str, Path], tmp_path: Path, speech_wav: bytes
) -> None:
    """Two starts of `python -m service` with one cache folder, each answering one upload
    (warm-up off, so that the upload is what compiles): the first compiles (cache misses),
    the second finds every graph in the cache (hits, no misses)."""
    env = {
        "STT_MODEL_DIR": str(checkpoints["wav2vec2-bert"]),
        "STT_COMPILE": "encoder",
        "STT_COMPILE_CACHE_DIR": str(tmp_path / "cache"),
        "STT_CPU_WORKERS": "1",
        "STT_WARMUP": "false",
        "STT_REQUEST_TIMEOUT_S": "600",  # this upload waits for the compiler
        "STT_MAX_REQUEST_TIMEOUT_S": "900",
    }
    figures = []
    for _ in range(2):
        server = ServiceProcess(**env)
        try:
            answer = httpx.post(
                server.url + "/v1/audio/transcriptions",
                files={"file": ("a.wav", speech_wav)},
                timeout=600,
            )
            assert answer.status_code == 200, answer.text
            figures.append(compile_counters(server.url))
        finally:
            assert server.stop() in CLEAN_EXIT
    first, second = figures
    assert first["compiles"] > 0
    assert first["fx_graph_miss"] > 0
    assert second["compiles"] > 0  # dynamo still traces; inductor's work comes from the cache
    assert second["fx_graph_hit"] >= first["fx_graph_miss"]
    assert second["fx_graph_miss"] == 0
    assert any((tmp_path / "cache").rglob("*")), "nothing was written to the cache folder"


@pytest.mark.parametrize("kind", ["wav2vec2-bert", "hubert-gpt2", "wav2vec2-bart", "whisper"])
def test_sdpa_attention_is_the_default_and_matches_eager(
    checkpoints: dict[str, Path], kind: str
) -> None:
    adapter = ModelAdapter(checkpoints[kind], "tiny")
    assert adapter.model.config._attn_implementation == "sdpa"
    audio = [clip(s, i) for i, s in enumerate((1.2, 2.5, 3.1))]
    sdpa = [row.tokens for row in adapter.transcribe(audio, PARAMS)]
    adapter.model.set_attn_implementation("eager")
    assert [row.tokens for row in adapter.transcribe(audio, PARAMS)] == sdpa


PHRASES = (
    "turn on the lights",
    "set volume to seven",
    "call home",
    "go up",
    "zero",
    "two five nine",
    "turn off the kitchen light",
    "call dad",
)


@pytest.mark.slow
@pytest.mark.timeout(900)  # compiling: about a minute a checkpoint on an idle 2-core CPU
def test_bundled_model_compiled_gives_eager_tokens_on_speech() -> None:
    """The bundled model's encoder compiled, on real speech (espeak-ng phrases at two rates
    and the model's own samples): every utterance gives eager's tokens (the budget is 99.5%
    of the test split; `python -m bench.fastpath exactness` checks the whole split)."""
    audios = [
        soxr.resample(speak(text, rate=rate), 22_050, 16_000).astype(np.float32)
        for text in PHRASES
        for rate in (140, 190)
    ]
    audios += [sf.read(p, dtype="float32")[0] for p in sorted(SAMPLES.glob("*.wav"))]
    eager = ModelAdapter(DEFAULT_MODEL_DIR, "bundled")
    fast = ModelAdapter(DEFAULT_MODEL_DIR, "bundled", fast=FastPathOptions(compile="encoder"))
    params = GenerationParams(max_new_tokens=eager.default_max_new_tokens)
    want = [eager.transcribe([a], params)[0].tokens for a in audios]
    got = [fast.transcribe([a], params)[0].tokens for a in audios]
    assert fastpath.stats.compiles > 0
    assert got == want
    assert [r.tokens for r in fast.transcribe(audios[:6], params)] == want[:6]


def test_short_groups_pair_similar_short_rows_only() -> None:
    rate = 16_000
    lengths = [int(s * rate) for s in (1.0, 2.9, 1.2, 8.0, 1.1, 2.5, 0.3)]
    # 1.0/1.1/1.2 s together, 2.5/2.9 s together, 0.3 s and the 8 s row alone
    assert short_groups(lengths, rate) == [[0, 4, 2], [5, 1], [3], [6]]
    assert short_groups([rate] * 20, rate) == [list(range(16)), list(range(16, 20))]


@pytest.mark.parametrize("kind", ["wav2vec2-bert", "hubert-gpt2", "wav2vec2-groupnorm-bert"])
def test_short_rows_share_encoder_calls_only_where_padding_is_exact(
    checkpoints: dict[str, Path], kind: str
) -> None:
    """A batch of short clips: a layer-norm encoder with an attention mask encodes similar
    lengths in one call, and every row keeps the tokens it gets alone; group-norm wav2vec2
    (padding changes its output) still encodes each row alone."""
    adapter = ModelAdapter(checkpoints[kind], "tiny")
    calls: list[int] = []
    adapter.model.get_encoder().register_forward_hook(
        lambda _m, args, kwargs, out: calls.append(1), with_kwargs=True
    )
    audio = [clip(s, i) for i, s in enumerate((1.0, 1.15, 2.4, 1.05, 2.7, 0.95))]
    alone = [adapter.transcribe([a], PARAMS)[0].tokens for a in audio]
    calls.clear()
    batched = [row.tokens for row in adapter.transcribe(audio, PARAMS)]
    assert batched == alone
    invariant = adapter.info.padding_invariant
    assert invariant == (kind != "wav2vec2-groupnorm-bert")
    # 0.95/1.0/1.05/1.15 s, 2.4/2.7 s: two calls; else one per row
    assert len(calls) == (2 if invariant else len(audio))


def test_int8_without_torchao_is_a_clear_start_up_error(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(StartupError, match=r"speech-serve\[int8\]"):
        ModelAdapter(checkpoints["wav2vec2-bert"], "tiny", fast=FastPathOptions(quantize="int8"))


INT8_CHECK = """
import sys
from pathlib import Path
import torch
from service.engine.adapter import ModelAdapter
from service.engine.fastpath import FastPathOptions
from tests.engine.test_fastpath import PARAMS, clip

model_dir = Path(sys.argv[1])
eager = ModelAdapter(model_dir, "tiny")
fast = ModelAdapter(model_dir, "tiny", fast=FastPathOptions(quantize="int8"))
linear = next(m for m in fast.model.get_encoder().modules() if isinstance(m, torch.nn.Linear))
assert type(linear.weight).__name__ != "Parameter", type(linear.weight)  # a torchao int8 tensor
decoder = fast.model.get_decoder()
decoder_linear = next(m for m in decoder.modules() if isinstance(m, torch.nn.Linear))
assert type(decoder_linear.weight).__name__ == "Parameter"
feats = eager.features([clip(2.0, 5)])
with torch.inference_mode():
    want = eager.model.get_encoder()(**feats).last_hidden_state
    got = fast.model.get_encoder()(**feats).last_hidden_state
error = float((got - want).norm() / want.norm())
assert error < 0.1, error
(row,) = fast.transcribe([clip(2.0, 5)], PARAMS)
assert row.tokens
print("int8 ok", error)
"""


def torchao_dir() -> Path:
    """The optional `int8` extra's torchao, installed (without dependencies: torch is ours) into
    the tests' cache folder rather than the environment, because once importable transformers
    imports it in every process (about 1.3 s each); `STT_TEST_CACHE` as for Whisper's assets."""
    cache = Path(os.environ.get("STT_TEST_CACHE", Path.home() / ".cache" / "speech-serve-tests"))
    target = cache / "torchao-0.18.0"
    if not (target / "torchao" / "__init__.py").is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
             "torchao==0.18.0"],
            check=True,
        )  # fmt: skip
    return target


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wav2vec2-bert", "whisper"])
def test_int8_quantizes_the_encoder_and_stays_close(
    checkpoints: dict[str, Path], kind: str
) -> None:
    """`STT_QUANTIZE=int8` (the `int8` extra): the encoder's linear weights become int8 and its
    output stays within a few percent of fp32's; the decoder is untouched. Runs in a child
    process that sees torchao (see `torchao_dir`)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(torchao_dir()), str(root)])}
    done = subprocess.run(
        [sys.executable, "-c", INT8_CHECK, str(checkpoints[kind])],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "int8 ok" in done.stdout
