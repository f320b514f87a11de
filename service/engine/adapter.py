"""The one place that knows how to load a checkpoint and turn audio into text with it.

Serves any `SpeechEncoderDecoderModel` folder (wav2vec2 / HuBERT encoders fed `input_values`;
BERT, GPT-2, BART decoders) and any `AutoModelForSpeechSeq2Seq` folder fed `input_features`
(Speech2Text, Whisper). Generation uses the KV cache and runs the encoder once per batch.
"""

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    SpeechEncoderDecoderModel,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import EncoderDecoderCache
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutput

from service.audio.windows import FRAME_SECONDS, voiced_frames
from service.engine import align, checkpoint
from service.engine.buckets import bucket_samples
from service.engine.fastpath import FastPath, FastPathOptions
from service.engine.fastpath import apply as apply_fast_paths
from service.engine.flax import load_flax
from service.engine.timestamps import TimedSegment
from service.engine.types import GenerationParams, WordTiming
from service.engine.whisper import WhisperSupport
from service.errors import InvalidRequest, StartupError, Unsupported

log = logging.getLogger(__name__)
_seed_lock = threading.Lock()
_MASKED_ENCODERS = {
    "wav2vec2",
    "hubert",
    "wav2vec2-conformer",
    "data2vec-audio",
    "wavlm",
}  # seeded sampling touches torch's global RNG


@dataclasses.dataclass
class Decoded:
    """One row of a batch's output."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    words: list[WordTiming] | None = None
    language: str | None = None  # the language decoded in, where the model says (Whisper)
    segments: list[TimedSegment] | None = None  # Whisper's, from its timestamp tokens


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the API reports about the loaded model."""

    name: str
    architecture: str  # e.g. "wav2vec2+bert" or "speech_to_text"
    encoder: str
    decoder: str
    sampling_rate: int
    input_name: str  # input_values | input_features
    padding_invariant: bool  # does batching with padding leave a row's output unchanged?
    encode_separately: bool  # encoder per row, decoder batched: any lengths may share a batch
    can_translate: bool
    max_input_seconds: float | None = None  # the longest window the encoder takes (Whisper: 30)


class _Cancelled(StoppingCriteria):
    """Marks rows finished as soon as their request is no longer wanted."""

    def __init__(self, wanted: Callable[[], list[bool]], rows: int) -> None:
        self.wanted = wanted
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        alive = self.wanted()
        per_beam = input_ids.shape[0] // self.rows
        done = torch.tensor([not a for a in alive for _ in range(per_beam)])
        return done.to(input_ids.device)


TokenSink = Callable[[int, float], None]


class _LastLogprobs(LogitsProcessor):
    """Keeps the log-softmax of the last step's final scores (after every other processor and
    warper), so a streamed token carries the log-probability `compute_transition_scores`
    gives it at the end. Leaves the scores as they are."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        self.logprobs = scores.float().log_softmax(-1)
        return scores


class _RowStreamer(BaseStreamer):
    """Hands each row's newly generated token and its log-probability to that row's sink,
    until the row ends.

    `generate` calls `put` first with the decoder prompt (2-D, skipped), then once per step with
    one token per row; a row that has emitted EOS is then padded, and those pads are not passed on.
    """

    def __init__(
        self,
        sinks: Sequence[TokenSink | None],
        eos: set[int],
        hidden: Callable[[int], bool],
        scores: _LastLogprobs,
    ) -> None:
        self.sinks = sinks
        self.eos = eos
        self.hidden = hidden  # tokens that are not text (Whisper's timestamps): not passed on
        self.scores = scores
        self.finished = [sink is None for sink in sinks]

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:
            return
        logprobs = self.scores.logprobs
        for row, token in enumerate(value.tolist()):
            sink = self.sinks[row]
            if self.finished[row] or sink is None:
                continue
            if token in self.eos:
                self.finished[row] = True
                continue
            if not self.hidden(token):
                logprob = float(logprobs[row, token]) if logprobs is not None else 0.0
                sink(int(token), round(logprob, 4))

    def end(self) -> None:
        self.finished = [True] * len(self.sinks)


_MAX_RUNS = 48  # stretches of speech scored for word timings; more: attention alone
_MAX_WORDS_PER_RUN = 8
_MAX_SCORED = 20_000  # (run, word span) pairs scored at most, bounding the cost per request
_RUN_PADDING = 0.1  # seconds of audio kept around a stretch of speech when scoring it


def _split_runs(
    timed: list[tuple[str, float, float]],
    runs: list[tuple[float, float]],
    assignment: list[tuple[int, int]],
) -> list[tuple[str, float, float]]:
    """Word times from the assignment of words to runs: a word alone in its run spans it;
    words sharing one are placed by their attention times, kept inside the run and in order."""
    out: list[tuple[str, float, float]] = []
    for (begin, end), (i, j) in zip(runs, assignment, strict=True):
        if i == j:  # a stretch with no word of the transcript (a noise, a word not decoded)
            continue
        if j - i == 1:
            out.append((timed[i][0], round(begin, 3), round(end, 3)))
            continue
        starts = [begin] + [min(max(timed[k][1], begin), end) for k in range(i + 1, j)]
        starts = list(np.maximum.accumulate(starts)) if starts else []
        for k, first in zip(range(i, j), starts, strict=True):
            last = starts[k - i + 1] if k + 1 < j else end
            out.append((timed[k][0], round(float(first), 3), round(float(last), 3)))
    return out


SHORT_ROW_SECONDS = 3.0  # rows up to this long may share an encoder call (`short_groups`)
_GROUP_PADDING = 1.25  # ... with rows at most 25% shorter than the group's longest
_MAX_GROUP = 16


def short_groups(lengths: list[int], rate: int) -> list[list[int]]:
    """Row indices grouped for encoding: short rows (<= `SHORT_ROW_SECONDS`) of similar length
    together (longest <= 1.25 x shortest, at most 16), every other row alone; in input order of
    each group's first row. On a CPU a long row gains nothing from a shared encoder call (it is
    compute-bound: eight 8 s clips of the base-size model took longer batched than alone)."""
    short = sorted((n, i) for i, n in enumerate(lengths) if n <= SHORT_ROW_SECONDS * rate)
    groups: list[list[int]] = []
    current: list[int] = []
    first = 0
    for n, i in short:
        if current and (n > first * _GROUP_PADDING or len(current) == _MAX_GROUP):
            groups.append(current)
            current = []
        if not current:
            first = max(1, n)
        current.append(i)
    if current:
        groups.append(current)
    groups += [[i] for i, n in enumerate(lengths) if n > SHORT_ROW_SECONDS * rate]
    return sorted(groups, key=min)


def _require(value: object, what: str, fix: str) -> None:
    if value is None:
        raise StartupError(f"checkpoint is missing {what}: {fix}")


class ModelAdapter:
    """A loaded checkpoint on one device: features → generate → detokenize."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        device: str = "cpu",
        dtype: str = "auto",
        *,
        encode_separately: bool | None = None,
        fast: FastPathOptions | None = None,
    ) -> None:
        """Load the checkpoint onto `device` as `dtype` (`auto`: float16 on CUDA, else float32).

        `fast`: the compile / quantization fast paths to apply (`fastpath`; default: none).

        `encode_separately` overrides the encoder path where the checkpoint allows both:
        None (the service's choice) decides by device and padding invariance; False runs the
        encoder on the padded batch, as on CUDA, so that CPU-only tests exercise that path.
        """
        self.model_dir = model_dir
        self._encode_separately_override = encode_separately
        self.device = torch.device(device)
        self.dtype = self._dtype(dtype, self.device)
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            raise StartupError(
                f"{model_dir} has no config.json: point STT_MODEL_DIR at a "
                "folder written by save_pretrained"
            )
        config = AutoConfig.from_pretrained(model_dir)
        checkpoint.require_weights(model_dir)
        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise StartupError(
                f"checkpoint {model_dir} has no feature extractor ({exc}); save one beside the "
                "weights: feature_extractor.save_pretrained(folder)"
            ) from exc
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, TypeError) as exc:
            raise StartupError(
                f"checkpoint {model_dir} has no usable tokenizer ({exc}); save the decoder's "
                "tokenizer beside the weights: tokenizer.save_pretrained(folder)"
            ) from exc
        model_cls: Any = (
            SpeechEncoderDecoderModel
            if config.model_type == "speech-encoder-decoder"
            else AutoModelForSpeechSeq2Seq
        )
        try:
            model: PreTrainedModel = (
                self._from_flax(model_dir, config)
                if checkpoint.flax_only(model_dir)
                else model_cls.from_pretrained(model_dir, dtype=self.dtype)
            )
        except (OSError, ValueError, KeyError) as exc:
            raise StartupError(f"cannot load weights from {model_dir}: {exc}") from exc
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.fastpath: FastPath = apply_fast_paths(self.model, fast or FastPathOptions())
        self._clock: dict[str, float] = {}
        self._time_encoder()
        self._check_generation_ids()
        self.whisper = (
            WhisperSupport(self.model, self.tokenizer, self.feature_extractor, str(model_dir))
            if config.model_type == "whisper"
            else None
        )
        self.max_target_length = self._max_target_length(config)
        self._step_positions: torch.Tensor | None = None  # per-row positions of a step
        self._fairseq_pad: int | None = None  # Speech2Text: positions skip pad tokens
        self._can_step = self.whisper is None and self._hook_positions()
        self.info = self._describe(name, config)
        log.info(
            "loaded %s (%s) on %s as %s", name, self.info.architecture, self.device, self.dtype
        )

    def _from_flax(self, model_dir: Path, config: Any) -> PreTrainedModel:
        """A transformers 4.x Flax checkpoint, converted at load time (no jax needed)."""
        model: PreTrainedModel = (
            SpeechEncoderDecoderModel(config=config)
            if config.model_type == "speech-encoder-decoder"
            else AutoModelForSpeechSeq2Seq.from_config(config)
        )
        load_flax(model, model_dir)
        if (model_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        log.info("converted the Flax weights of %s to PyTorch", model_dir)
        return model.to(self.dtype)  # type: ignore[arg-type]

    @staticmethod
    def _dtype(name: str, device: torch.device) -> torch.dtype:
        if name == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            name
        ]

    def _time_encoder(self) -> None:
        """Hooks that add each encoder forward's wall time to the running batch's clock.

        The encoder runs inside `generate` (or alone, see `_encode_separately`); hooks time it
        wherever it runs. On CUDA the end hook synchronises so the time is the kernels' own.
        """
        encoder = self.model.get_encoder()
        started: list[float] = []

        def before(*_: object) -> None:
            started.append(time.perf_counter())

        def after(*_: object) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._tick("encoder", time.perf_counter() - started.pop())

        encoder.register_forward_pre_hook(before)
        encoder.register_forward_hook(after)

    def take_clock(self) -> dict[str, float]:
        """Seconds per stage (features, encoder, ...) since the last call, and a fresh clock."""
        clock, self._clock = self._clock, {}
        return clock

    def _tick(self, stage: str, seconds: float) -> None:
        self._clock[stage] = self._clock.get(stage, 0.0) + seconds

    def _check_generation_ids(self) -> None:
        gen = self.model.generation_config
        cfg = self.model.config
        for attr in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(gen, attr, None)
            if value is None:
                value = getattr(cfg, attr, None)
                setattr(gen, attr, value)
            _require(
                value,
                f"`{attr}`",
                f"set model.config.{attr} (e.g. from the tokenizer) and save again; "
                "`python -m model_store compose` does this for you",
            )

    @property
    def default_max_new_tokens(self) -> int:
        """The checkpoint's own `max_new_tokens` (generation config), else 128."""
        value = getattr(self.model.generation_config, "max_new_tokens", None)
        return int(value) if value else 128

    @functools.cached_property
    @torch.inference_mode()
    def min_samples(self) -> int:
        """The shortest input (samples) the encoder accepts, found by trying it.

        Convolutional front ends need a minimum length (wav2vec2-base: 400 samples, its
        receptive field); shorter audio makes the encoder raise. Probing the real encoder with
        faint noise (bisection over lengths, a dozen tiny forwards at start-up) covers every
        architecture without modelling each one's convolutions.
        """
        rng = np.random.default_rng(0)
        encoder = self.model.get_encoder()

        failure: list[BaseException] = []

        def runs(length: int) -> bool:
            audio = rng.normal(0, 1e-3, length).astype(np.float32)
            try:
                feats = self.features([audio])
                feats.pop("attention_mask", None)
                encoder(**feats)
            except (RuntimeError, ValueError, IndexError) as exc:
                failure[:] = [exc]
                return False
            return True

        low, high = 0, self.info.sampling_rate  # low fails (or is empty), high must work
        with self.fastpath.eager():  # odd sizes: not worth a compiled graph each
            if not runs(high):
                cause = failure[0] if failure else None
                raise StartupError(
                    f"{self.model_dir} cannot encode one second of audio "
                    f"({type(cause).__name__}: {cause}); check that its preprocessor_config.json "
                    "matches its encoder"
                ) from cause
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if runs(middle) else (middle, high)
        self._clock = {}
        return high

    @staticmethod
    def _max_target_length(config: Any) -> int:
        """How many decoder positions the model has: generation must stop before the last."""
        decoder = config.decoder if config.model_type == "speech-encoder-decoder" else config
        for attr in ("max_target_positions", "max_position_embeddings", "n_positions"):
            value = getattr(decoder, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1 << 16

    def _padding_invariant(self, config: Any) -> bool:
        """Whether a row's output is the same padded in a batch as alone.

        True for wav2vec2-style encoders with layer-norm feature extraction fed an attention
        mask (padded frames are masked and zeroed before the positional convolution), and for
        Whisper (every input is padded to 30 s anyway). False otherwise: group-norm wav2vec2
        normalises over the padding, and Speech2Text's strided convolutions leak padding into
        the last real frame. Such models get inputs padded to length buckets (`buckets`).
        """
        if config.model_type == "whisper":
            return True
        masks = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        if config.model_type != "speech-encoder-decoder" or not masks:
            return False
        encoder = config.encoder
        return encoder.model_type in _MASKED_ENCODERS and encoder.feat_extract_norm == "layer"

    def _describe(self, name: str, config: Any) -> ModelInfo:
        if config.model_type == "speech-encoder-decoder":
            encoder, decoder = config.encoder.model_type, config.decoder.model_type
            arch = f"{encoder}+{decoder}"
        else:
            encoder = decoder = arch = config.model_type
        input_name = self.feature_extractor.model_input_names[0]
        invariant = self._padding_invariant(config)
        lang_codes = getattr(self.tokenizer, "lang_code_to_id", None) or {}
        return ModelInfo(
            name=name,
            architecture=arch,
            encoder=encoder,
            decoder=decoder,
            sampling_rate=int(self.feature_extractor.sampling_rate),
            input_name=input_name,
            padding_invariant=invariant,
            # wav2vec2-style encoder + decoder on CPU, or any encoder whose output padding would
            # change: encode each row alone, batch the decoder (see `_encode_separately`)
            encode_separately=config.model_type == "speech-encoder-decoder"
            and (
                (self.device.type == "cpu" or not invariant)
                if self._encode_separately_override is None
                else self._encode_separately_override
            ),
            can_translate=self.whisper.can_translate if self.whisper else bool(lang_codes),
            max_input_seconds=self.whisper.max_input_seconds if self.whisper else None,
        )

    # --- request-side checks (run before queueing) ---

    def validate(self, params: GenerationParams) -> None:
        """Reject what this model cannot do, before the request costs a queue slot."""
        if self.whisper is not None:
            self.whisper.validate(params)
            return
        if params.task == "translate" and not self.info.can_translate:
            raise Unsupported(
                f"model {self.info.name} ({self.info.architecture}) cannot translate: its "
                "decoder has no target-language tokens",
                param="model",
            )
        codes = getattr(self.tokenizer, "lang_code_to_id", None)
        if params.language and codes and self._language_code(params.language) is None:
            known = ", ".join(sorted({code.split("_")[0] for code in codes}))
            raise InvalidRequest(
                f"unknown language {params.language!r}; this model knows {known}",
                param="language",
            )

    def _language_code(self, language: str) -> str | None:
        codes: dict[str, int] = getattr(self.tokenizer, "lang_code_to_id", None) or {}
        for code in codes:
            if code == language or code.split("_")[0] == language:
                return code
        return None

    # --- the model call ---

    def features(self, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Padded model inputs (and attention mask where the extractor gives one)."""
        started = time.perf_counter()
        try:
            return self._features(audios)
        finally:
            self._tick("features", time.perf_counter() - started)

    def _features(self, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        masks = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        if not self.info.padding_invariant:  # same padded input alone or in any batch
            rate = self.info.sampling_rate
            audios = [np.pad(a, (0, bucket_samples(len(a), rate) - len(a))) for a in audios]
        # Whisper's extractor pads (and would silently cut) every input to its 30 s window:
        # its own padding, not the longest input's (`Engine.submit` refuses longer audio)
        padding: dict[str, Any] = {} if self.whisper is not None else {"padding": True}
        feats = self.feature_extractor(
            list(audios),
            sampling_rate=self.info.sampling_rate,
            return_attention_mask=masks,
            return_tensors="pt",
            **padding,
        )
        out = {self.info.input_name: feats[self.info.input_name].to(self.device, self.dtype)}
        if masks and "attention_mask" in feats:
            out["attention_mask"] = feats["attention_mask"].to(self.device)
        return out

    def generate_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            # start token + generated tokens must fit the decoder's position table
            "max_new_tokens": max(1, min(params.max_new_tokens, self.max_target_length - 2)),
            "num_beams": params.num_beams,
            "do_sample": params.do_sample,
            "repetition_penalty": params.repetition_penalty,
            "use_cache": True,
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        if params.do_sample:
            kwargs["temperature"] = params.temperature
            kwargs["top_k"] = params.top_k if params.top_k is not None else 0
            kwargs["top_p"] = params.top_p if params.top_p is not None else 1.0
        if self.whisper is not None:
            extra = self.whisper.generate_kwargs(params, self.device)
            room = extra.pop("max_new_tokens")  # what the prompt leaves of the positions
            kwargs["max_new_tokens"] = max(1, min(params.max_new_tokens, room))
            kwargs.update(extra)
        elif params.language or params.task == "translate":
            code = self._language_code(params.language or "en")
            if code is not None:
                kwargs["forced_bos_token_id"] = self.tokenizer.lang_code_to_id[code]
        return kwargs

    @torch.inference_mode()
    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        params: GenerationParams,
        wanted: Callable[[], list[bool]] | None = None,
        timings: dict[str, float] | None = None,
        sinks: Sequence[TokenSink | None] | None = None,
        grow: Callable[[], list[tuple[np.ndarray, TokenSink | None]]] | None = None,
    ) -> list[Decoded]:
        """Decode a batch that shares `params`; `wanted()` lets cancelled rows stop early.

        `timings`, when given, receives the seconds spent per stage: features, encoder,
        decoding (the decoder steps and search) and detokenize. `sinks[i]`, when given, receives
        row i's token ids as they are generated (not with beam search: beams are only decided at
        the end, so those rows get their tokens from the result). `grow()`, for models that
        encode rows one by one (`encode_separately`), is asked for more rows once the current
        ones are encoded, until it has none: requests that arrived meanwhile join this batch's
        decoder steps. The result has a row for each input and each grown row, in that order.
        """
        self._clock = {}
        audios = list(audios)
        sinks = list(sinks) if sinks is not None else [None] * len(audios)
        if self.info.encode_separately and (len(audios) > 1 or grow is not None):
            inputs = self._encode_separately(audios, sinks, grow)
        else:
            inputs = self.features(audios)
            if self.whisper is not None:  # else language detection runs the encoder again
                hidden = self.model.get_encoder()(**inputs).last_hidden_state
                inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
        kwargs = self.generate_kwargs(params)
        if wanted is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(wanted, len(audios))])
        if any(sinks) and params.num_beams == 1:
            last = _LastLogprobs()
            kwargs["logits_processor"] = LogitsProcessorList(
                [*kwargs.get("logits_processor", []), last]
            )
            kwargs["streamer"] = _RowStreamer(sinks, self._eos_ids(), self._not_text, last)
        encoded_before = self._clock.get("encoder", 0.0)
        started = time.perf_counter()
        if params.do_sample and params.seed is not None:
            with _seed_lock, torch.random.fork_rng(devices=self._rng_devices()):
                torch.manual_seed(params.seed)
                out = self.model.generate(**inputs, **kwargs)
        else:
            out = self.model.generate(**inputs, **kwargs)
        generating = time.perf_counter() - started
        self._tick("decoding", generating - (self._clock.get("encoder", 0.0) - encoded_before))
        started = time.perf_counter()
        rows = self._decode(out, params)
        self._tick("detokenize", time.perf_counter() - started)
        if params.words:
            started = time.perf_counter()
            for audio, row in zip(audios, rows, strict=True):
                row.words = self.word_timings(audio, row.tokens)
            self._tick("align", time.perf_counter() - started)
        if timings is not None:
            timings.update(self._clock)
        return rows

    def _encode_separately(
        self,
        audios: list[np.ndarray],
        sinks: list[TokenSink | None],
        grow: Callable[[], list[tuple[np.ndarray, TokenSink | None]]] | None = None,
    ) -> dict[str, Any]:
        """Run the encoder on each input alone (short rows of a padding-invariant encoder in
        groups of similar length, `_encode_rows`), then let the decoder steps share one batch.

        Each row's encoder output is what it would be alone, and the decoder sees the padded
        encoder frames through the cross-attention mask only. On a CPU the encoder gains little
        from batching (it is compute-bound) while the decoder steps gain several times, so this
        batches every length together without the encoder's padding waste. Rows from `grow()`
        are appended to `audios` and `sinks`.
        """
        states: list[torch.Tensor] = []
        samples: list[int] = []
        row = 0
        while True:
            if row < len(audios):
                encoded = self._encode_rows(audios[row:])
                states.extend(state for state, _ in encoded)
                samples.extend(count for _, count in encoded)
                row = len(audios)
            extra = grow() if grow is not None else []
            if not extra:
                break
            for audio, sink in extra:
                audios.append(audio)
                sinks.append(sink)
        frames = max(state.shape[0] for state in states)
        hidden = states[0].new_zeros((len(states), frames, states[0].shape[-1]))
        mask = torch.zeros((len(states), max(samples)), dtype=torch.long, device=self.device)
        for index, (state, count) in enumerate(zip(states, samples, strict=True)):
            hidden[index, : state.shape[0]] = state
            mask[index, :count] = 1  # the model turns sample counts into encoder-frame masks
        return {
            "encoder_outputs": BaseModelOutput(last_hidden_state=hidden),
            "attention_mask": mask,
        }

    def _encode_rows(self, audios: list[np.ndarray]) -> list[tuple[torch.Tensor, int]]:
        """Each row's encoder output (frames x hidden) and input samples, in input order.

        Rows are encoded alone, except short rows of a padding-invariant encoder (layer-norm
        wav2vec2 fed an attention mask), which share one padded encoder call with rows of
        similar length (`short_groups`): their outputs equal those alone, and per-call costs
        (Python, small matmuls) dominate short clips (measured on the bundled model: 1-3 s clips
        encode in about 25 ms each alone, 1.1-1.4x faster batched)."""
        out: list[tuple[torch.Tensor, int] | None] = [None] * len(audios)
        groups = (
            short_groups([len(a) for a in audios], self.info.sampling_rate)
            if self.info.padding_invariant
            else [[i] for i in range(len(audios))]
        )
        for group in groups:
            feats = self.features([audios[i] for i in group])
            hidden = self.model.encoder(**feats).last_hidden_state
            if len(group) == 1:
                out[group[0]] = (hidden[0], feats[self.info.input_name].shape[-1])
                continue
            for index, i in enumerate(group):
                frames = self.encoder_frames(len(audios[i]))
                out[i] = (hidden[index, :frames], len(audios[i]))
        return [row for row in out if row is not None]

    # --- the step-level API of the engine's own decoding loop (`batch.Batch`) ---

    def _hook_positions(self) -> bool:
        """Let each row of a decoder step have its own position.

        Rows of a running batch joined at different steps, so their histories differ in length
        (the shorter ones are padded on the left of the KV cache and masked). The decoders read
        their position from the cache length, one for the whole batch, and BART ignores
        `position_ids`: a forward hook on the positional embedding replaces its output with each
        row's own embedding (`_step_positions`) while a step runs. False for decoders whose
        positional embedding is not known here: they decode through `generate`.
        """
        model: Any = self.model
        decoder_type = (
            model.config.decoder.model_type
            if model.config.model_type == "speech-encoder-decoder"
            else model.config.model_type
        )
        table: torch.Tensor
        if decoder_type == "bert":
            module = model.decoder.bert.embeddings.position_embeddings
            table, offset = module.weight, 0
        elif decoder_type == "gpt2":
            module = model.decoder.transformer.wpe
            table, offset = module.weight, 0
        elif decoder_type in ("bart", "mbart"):
            module = model.decoder.model.decoder.embed_positions
            table, offset = module.weight, int(module.offset)
        elif decoder_type == "speech_to_text":
            module = model.model.decoder.embed_positions
            # fairseq positions: from the pad id + 1, and a pad token at the pad id
            self._fairseq_pad = int(module.padding_idx)

            def lookup(positions: torch.Tensor) -> torch.Tensor:
                return module.weights[positions]

            module.register_forward_hook(self._position_hook(lookup))
            return True
        else:
            return False
        module.register_forward_hook(self._position_hook(lambda p: table[p + offset]))
        return True

    def _position_hook(self, lookup: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> Any:
            if self._step_positions is None:
                return None  # `generate` and every other caller: the module's own output
            return lookup(self._step_positions).to(output.dtype)

        return hook

    def step_positions(self, histories: Sequence[list[int]], width: int) -> torch.Tensor:
        """Each row's positions for the last `width` tokens of its ids (`histories`), as the
        decoder would number them alone: their indices, or for Speech2Text fairseq's numbering
        (from the pad id + 1; a pad token itself sits at the pad id, the zero embedding)."""
        pad = self._fairseq_pad
        rows = []
        for ids in histories:
            if pad is None:
                rows.append(list(range(len(ids) - width, len(ids))))
                continue
            first = len(ids) - width
            rows.append([pad if ids[k] == pad else pad + 1 + k for k in range(first, len(ids))])
        return torch.tensor(rows, device=self.device)

    def steppable(self, params: GenerationParams) -> bool:
        """Whether requests with `params` decode in the engine's own loop (`batch.Batch`):
        greedy and sampling on every encoder-decoder whose positions the loop can set. Beam
        search (beams are only decided at the end) and Whisper (its `generate` builds prompts,
        detects languages and applies timestamp rules) run through `generate`."""
        return self._can_step and params.num_beams == 1

    @torch.inference_mode()
    def encode(self, audios: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, int]]:
        """Each input's encoder output (frames x dim) and the length of its model input (samples
        or feature frames) that the encoder attention mask covers.

        Each input is encoded alone (no padding reaches the encoder, so the output is what it
        is alone), except where the encoder is padding invariant: where batched encoding pays
        (CUDA) one padded forward, each row cut to its own frames; on a CPU short rows of similar
        length share a call (`_encode_rows`).
        """
        axis = 1  # input_values (batch, samples) and input_features (batch, frames, bins)
        out: list[tuple[torch.Tensor, int]] = []
        encoder = self.model.get_encoder()
        if self.info.padding_invariant and not self.info.encode_separately and len(audios) > 1:
            feats = self.features(audios)
            hidden = encoder(**feats).last_hidden_state
            for index, audio in enumerate(audios):
                frames = self.encoder_frames(len(audio))
                out.append((hidden[index, :frames], int(feats["attention_mask"][index].sum())))
        elif self.info.padding_invariant:
            out = self._encode_rows(list(audios))  # short rows of similar length share a call
        else:
            for audio in audios:
                feats = self.features([audio])
                hidden = encoder(**feats).last_hidden_state
                out.append((hidden[0], int(feats[self.info.input_name].shape[axis])))
        return out

    def decoding_setup(self, params: GenerationParams) -> tuple[list[int], Any, set[int], int]:
        """What `generate` would decode a request with: its decoder prompt, its logits
        processors (built by transformers' own `_get_logits_processor` from the same generation
        config, so repetition penalty, forced tokens, suppression and the sampling warpers are
        exactly `generate`'s), its end-of-sequence ids and its maximum length."""
        kwargs = self.generate_kwargs(params)
        for key in ("return_dict_in_generate", "output_scores", "use_cache", "num_beams"):
            kwargs.pop(key, None)
        model: Any = self.model
        config, _ = model._prepare_generation_config(None, **kwargs)
        model._prepare_special_tokens(config, False, device=self.device)
        start = config.decoder_start_token_id
        prompt = [int(start)] if isinstance(start, int) else [int(t) for t in start]
        config.max_length = config.max_new_tokens + len(prompt)
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=len(prompt),
            encoder_input_ids=None,
            device=self.device,
            model_kwargs={},
        )
        return prompt, processors, self._eos_ids(), int(config.max_length)

    @torch.inference_mode()
    def decoder_step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        self_mask: torch.Tensor,
        hidden: torch.Tensor,
        input_mask: torch.Tensor,
        cache: EncoderDecoderCache | None,
    ) -> tuple[torch.Tensor, EncoderDecoderCache]:
        """One decoder forward for a batch: `ids` (rows x new tokens) at `positions`, attending
        to the cached positions where `self_mask` is 1 and to the encoder frames of `hidden` that
        `input_mask` (model input level, as the encoder was fed) covers. Returns the last
        position's logits (float32) and the updated cache."""
        self._step_positions = positions
        try:
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                attention_mask=input_mask,
                decoder_input_ids=ids,
                decoder_attention_mask=self_mask,
                cache=cache,
                use_cache=True,
            )
        finally:
            self._step_positions = None
        return out.logits[:, -1].float(), out.cache

    def encoder_frames(self, samples: int) -> int:
        """How many encoder frames (the audio tokens the decoder attends to) `samples` make."""
        encoder = self.model.get_encoder()
        lengths = getattr(encoder, "_get_feat_extract_output_lengths", None)
        if self.model.config.model_type == "speech-encoder-decoder" and lengths is not None:
            # wav2vec2 family: the convolutional front end's arithmetic
            return int(lengths(torch.tensor([samples])).item())
        hop = int(getattr(self.feature_extractor, "hop_length", 160))
        strides = 2  # Whisper: two convolutions, the second with stride 2
        if self.model.config.model_type == "speech_to_text":
            strides = 2 ** int(self.model.config.num_conv_layers)
        return max(1, -(-samples // hop // strides))

    @torch.inference_mode()
    def word_timings(self, audio: np.ndarray, tokens: list[int]) -> list[WordTiming]:
        """When each word of `tokens` (a transcript of `audio`) is spoken.

        Two methods, the second refining the first:

        1. Cross-attention + DTW, as Whisper makes word timestamps: the decoder runs once more
           over its own tokens (teacher forcing) and `align.word_times` aligns the attention of
           the positions that predict each token (and end-of-text) with the encoder frames.
        2. Where the audio has pauses, the likelihood of the words over the stretches of speech
           between them: each stretch is encoded alone and scored against every run of
           consecutive words (log P(words, end-of-text | stretch)); dynamic programming picks
           the most likely split of the transcript over the stretches (`align.assign_words`).
           A word alone in its stretch spans it; several share it by their DTW times. This
           holds where a model's attention is too diffuse to align (a small decoder) and costs
           one encoder pass per stretch plus one batched decoder pass.

        Whisper's decoder prompt (language, task tokens) is not rebuilt here, so Whisper
        checkpoints get method 1, which their alignment heads serve well.
        """
        if not tokens:
            return []
        rate = self.info.sampling_rate
        seconds = len(audio) / rate
        shares = []
        before = ""
        for index in range(len(tokens)):
            text = str(self.tokenizer.decode(tokens[: index + 1], skip_special_tokens=True))
            shares.append(text[len(before) :] if text.startswith(before) else text)
            before = text
        voiced = voiced_frames(audio, rate)
        timed = self._attention_times(audio, tokens, shares, voiced)
        spans = align.group_words(shares)
        runs = align.speech_runs(voiced, FRAME_SECONDS)
        group = min(len(spans), _MAX_WORDS_PER_RUN)
        cost = len(runs) * (len(spans) + 1) * (group + 1)
        if (
            self.model.config.model_type != "whisper"
            and 2 <= len(runs) <= _MAX_RUNS
            and cost <= _MAX_SCORED
            and len(timed) == len(spans)
        ):
            words = [tokens[span.first : span.last + 1] for span in spans]
            scores = self._run_scores(audio, runs, words, group)
            assignment = align.assign_words(scores, len(runs), len(words))
            if assignment:
                timed = _split_runs(timed, runs, assignment)
        return [WordTiming(word, min(s, seconds), min(e, seconds)) for word, s, e in timed]

    def _attention_times(
        self, audio: np.ndarray, tokens: list[int], shares: list[str], voiced: np.ndarray
    ) -> list[tuple[str, float, float]]:
        feats = self.features([audio])
        start = self.model.generation_config.decoder_start_token_id
        prompt = [start] if isinstance(start, int) else list(start)
        decoder_ids = torch.tensor([[*prompt, *tokens]], device=self.device)
        out = self._with_attention_weights(feats, decoder_ids)
        if not out.cross_attentions or out.cross_attentions[0] is None:
            return []
        frames = min(self.encoder_frames(len(audio)), out.cross_attentions[0].shape[-1])
        rows = slice(len(prompt) - 1, len(prompt) + len(tokens))  # predict tokens, then EOS
        layers = out.cross_attentions
        heads = getattr(self.model.generation_config, "alignment_heads", None)
        if heads:  # Whisper checkpoints name the heads that align (timing.py)
            attention = torch.stack(
                [layers[layer][0, head, rows, :frames] for layer, head in heads]
            )
        else:
            attention = torch.cat([a[0, :, rows, :frames] for a in layers])
        return align.word_times(
            attention.float().cpu().numpy().astype(np.float64),
            shares,
            seconds_per_frame=len(audio) / self.info.sampling_rate / max(1, frames),
            voiced=voiced,
            voiced_frame_seconds=FRAME_SECONDS,
        )

    def _run_scores(
        self,
        audio: np.ndarray,
        runs: list[tuple[float, float]],
        words: list[list[int]],
        group: int,
    ) -> dict[tuple[int, int, int], float]:
        """log P(words i..j-1, end-of-text | run r's audio) for every run r and every run of
        at most `group` consecutive words (none included)."""
        rate = self.info.sampling_rate
        start = self.model.generation_config.decoder_start_token_id
        eos = min(self._eos_ids())
        pad = self.model.generation_config.pad_token_id
        spans = [
            (i, j) for i in range(len(words) + 1) for j in range(i, min(len(words), i + group) + 1)
        ]
        sequences = [[t for word in words[i:j] for t in word] for i, j in spans]
        length = max(len(seq) for seq in sequences) + 1
        inputs = torch.full((len(spans), length), int(pad), dtype=torch.long)
        targets = torch.full((len(spans), length), -1, dtype=torch.long)
        for row, seq in enumerate(sequences):
            inputs[row, : len(seq) + 1] = torch.tensor([start, *seq])
            targets[row, : len(seq) + 1] = torch.tensor([*seq, eos])
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        scores: dict[tuple[int, int, int], float] = {}
        encoder = self.model.get_encoder()
        for index, (begin, end) in enumerate(runs):
            # the run and up to `_RUN_PADDING` s around it, never past halfway to its neighbours
            before = runs[index - 1][1] if index else 0.0
            after = runs[index + 1][0] if index + 1 < len(runs) else len(audio) / rate
            lo = int(max(begin - _RUN_PADDING, (before + begin) / 2, 0.0) * rate)
            hi = int(min(end + _RUN_PADDING, (end + after) / 2) * rate)
            piece = audio[lo:hi]
            if len(piece) < self.min_samples:
                piece = np.pad(piece, (0, self.min_samples - len(piece)))
            feats = self.features([piece])
            feats.pop("attention_mask", None)
            hidden = encoder(**feats).last_hidden_state
            out = self.model(
                encoder_outputs=BaseModelOutput(
                    last_hidden_state=hidden.expand(len(spans), -1, -1)
                ),
                decoder_input_ids=inputs,
            )
            logprobs = out.logits.float().log_softmax(-1)
            picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            totals = (picked * (targets >= 0)).sum(-1).tolist()
            for (i, j), total in zip(spans, totals, strict=True):
                scores[(index, i, j)] = float(total)
        return scores

    def _with_attention_weights(
        self, feats: dict[str, torch.Tensor], decoder_ids: torch.Tensor
    ) -> Any:
        """One teacher-forced forward that returns attention weights: fused attention kernels
        (sdpa) do not return them, so the replica (owned by this worker thread alone) runs the
        eager implementation for this call."""
        config = self.model.config
        before = getattr(config, "_attn_implementation", None)
        if before in (None, "eager"):
            return self.model(**feats, decoder_input_ids=decoder_ids, output_attentions=True)
        self.model.set_attn_implementation("eager")
        try:
            return self.model(**feats, decoder_input_ids=decoder_ids, output_attentions=True)
        finally:
            self.model.set_attn_implementation(before)

    def _not_text(self, token: int) -> bool:
        """Whisper's special, language, task and timestamp tokens (all from `<|endoftext|>`
        on) carry no text."""
        return self.whisper is not None and token >= self.whisper.first_special

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos) if isinstance(eos, list) else {int(eos)}

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _decode(self, out: Any, params: GenerationParams) -> list[Decoded]:
        sequences = out.sequences
        beams = getattr(out, "beam_indices", None)
        if out.scores and out.scores[0].shape[0] == sequences.shape[0]:
            beams = None  # Whisper hands back each row's own beam's scores already
        scores = self.model.compute_transition_scores(
            sequences, out.scores, beams, normalize_logits=True
        )
        steps = scores.shape[1]
        generated = sequences[:, -steps:] if steps else sequences[:, :0]
        prompts = sequences[:, : sequences.shape[1] - steps].tolist()
        rows_out = zip(generated.tolist(), scores.float().tolist(), prompts, strict=True)
        return [self.decoded(ids, lps, prompt, params) for ids, lps, prompt in rows_out]

    def decoded(
        self,
        generated: list[int],
        logprobs: list[float],
        prompt: list[int],
        params: GenerationParams,
    ) -> Decoded:
        """One row's result from its generated ids and their log-probabilities: text tokens up
        to the first end-of-sequence (special, pad and non-text tokens left out), the text,
        and the language it was decoded in."""
        special = set(self.tokenizer.all_special_ids)
        pad = self.model.generation_config.pad_token_id
        eos_ids = self._eos_ids()
        segments = None
        if params.timestamps and self.whisper is not None:
            segments = self.whisper.segments(generated, logprobs, eos_ids)
        tokens, kept = [], []
        for token, logprob in zip(generated, logprobs, strict=True):
            if token in eos_ids:
                break
            if token == pad or token in special or self._not_text(token):
                continue
            if not np.isfinite(logprob):
                continue
            tokens.append(token)
            kept.append(round(float(logprob), 4))
        text = str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        language = (
            self.whisper.language_used(prompt, params)
            if self.whisper
            else self._forced_language(params)
        )
        return Decoded(
            text=text, tokens=tokens, logprobs=kept, language=language, segments=segments
        )

    def _forced_language(self, params: GenerationParams) -> str | None:
        """The target language an mBART-style decoder was forced to, else None (unknown).
        (Whisper's comes from each row's prompt: forced or detected.)"""
        if "forced_bos_token_id" in self.generate_kwargs(params):
            return params.language or "en"
        return None

    def warm_up(self) -> None:
        """One generate on a second of hiss: allocations and kernels happen before traffic.

        With compiled modules, also every input shape torch specialises a graph for (see
        `FastPath.warm_up_seconds`), so that traffic meets compiled graphs only."""
        # faint noise, not digital silence: some extractors divide by the signal's deviation
        rng = np.random.default_rng(0)
        rate = self.info.sampling_rate
        hiss = rng.normal(0, 1e-3, rate).astype(np.float32)
        self.transcribe([hiss], GenerationParams(max_new_tokens=4))
        if not self.fastpath.compiled:
            return
        # rows share a compiled module in a batch: the decoder always, the encoder unless
        # rows are encoded one by one
        batched = (
            "decoder" in self.fastpath.compiled
            or not self.info.encode_separately
            or self.info.padding_invariant  # short rows share encoder calls (`short_groups`)
        )
        for seconds in self.fastpath.warm_up_seconds:
            audio = rng.normal(0, 1e-3, int(seconds * rate)).astype(np.float32)
            self.transcribe([audio], GenerationParams(max_new_tokens=4))
            if batched:  # a batch of one is its own graph: compile one of several rows too
                pair = [audio, audio[: len(audio) * 9 // 10]]
                self.transcribe(pair, GenerationParams(max_new_tokens=4))
