"""Fast paths for a loaded model: `torch.compile` of the encoder (and the decoder's own
modules) and int8 quantization, applied once where the adapter loads the model (`apply`).

Kept apart from the adapter and the generation loop on purpose: a fast path changes how a
module computes, never what the loop does with it, so it is a wrapper around the module's
`forward` that the loop calls as before (hooks, `generate` and the engine's own loop all see
the same module).

Variable audio lengths without unbounded recompiles: the encoder is compiled with dynamic
shapes (`dynamic=True`), one graph for every length, measured as fast as a graph per length
on the bundled model (10 ms against 12 ms for a 3 s clip; eager 21 ms). Dynamic shapes need no
padding, so they are exact for every architecture, group-norm wav2vec2 and Speech2Text
included, where padding to length buckets would change the output. torch still specialises a
few sizes (a batch of one, very short inputs): `warm_up` compiles those before `/ready`, inputs
shorter than `MIN_COMPILED_SECONDS` run eagerly (they cost little and would specialise more
graphs), and calls that ask for attention weights or hidden states (word timings) run eagerly
too. What is compiled is counted (`stats`): `/metrics` shows compiles, compile seconds and the
compile cache's hits, and tests assert that traffic after warm-up compiles nothing new.

A restart does not pay the compile again: inductor's FX graph and AOTAutograd caches are
written under `cache_dir` (`TORCHINDUCTOR_CACHE_DIR`), and a second start finds them.
"""

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from service.errors import StartupError
from service.metrics import CompileFigures

log = logging.getLogger(__name__)

CompileMode = Literal["off", "encoder", "all"]
QuantizeMode = Literal["off", "int8"]

# Input lengths (seconds) `ModelAdapter.warm_up` runs, alone and in a batch of two, when
# something is compiled. torch guards the first convolution's input size by ranges (its
# backend's heuristics), so a sweep over the lengths served, not two or three, settles them.
WARM_UP_SECONDS = (0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)
MIN_COMPILED_SECONDS = 0.5  # shorter inputs run eagerly: cheap, and each would specialise
# Arguments that change what the encoder returns: such calls (word timings) run eagerly.
_EAGER_FLAGS = ("output_attentions", "output_hidden_states")


@dataclasses.dataclass(frozen=True)
class FastPathOptions:
    """What to speed up. `compile`: `off`, `encoder`, `all` (encoder and decoder module, see
    `_compile_decoder`); `quantize`: `off` or `int8` (the encoder's linear layers, see
    `_quantize`); `cache_dir`: where the compile cache lives (None: torch's default,
    `/tmp/torchinductor_<user>`)."""

    compile: CompileMode = "off"
    quantize: QuantizeMode = "off"
    cache_dir: Path | None = None


@dataclasses.dataclass
class CompileStats:
    """Process-wide compile figures (torch's compiler state is process-wide too)."""

    compiles: int = 0  # graphs compiled: first compiles and recompiles alike
    seconds: float = 0.0  # wall time spent compiling
    eager_calls: int = 0  # calls of a compiled module that ran eagerly by design (see above)

    def cache(self) -> dict[str, int]:
        """Hits and misses of the on-disk caches (`fx_graph`, `aot_autograd`), from torch's
        own counters."""
        from torch._dynamo.utils import counters

        return {
            "fx_graph_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
            "aot_autograd_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "aot_autograd_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
        }


stats = CompileStats()


def figures() -> CompileFigures:
    """`stats` as `/metrics` reports them."""
    with _stats_lock:
        return CompileFigures(stats.compiles, stats.seconds, stats.eager_calls, stats.cache())


_stats_lock = threading.Lock()
_started: dict[str, float] = {}


def _compile_started(args: Any) -> None:
    with _stats_lock:
        _started[args.compile_id] = time.perf_counter()


def _compile_ended(args: Any) -> None:
    with _stats_lock:
        began = _started.pop(args.compile_id, None)
        stats.compiles += 1
        if began is not None:
            stats.seconds += time.perf_counter() - began


def _count_compiles() -> None:
    """Register the compiler callbacks that fill `stats`, unless they are registered: checked
    on every call, because `torch._dynamo.reset()` clears every registered callback."""
    from torch._dynamo.callback import callback_handler

    if _compile_started not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_compile_started)
    if _compile_ended not in callback_handler.end_callbacks:
        callback_handler.register_end_callback(_compile_ended)


def use_cache_dir(cache_dir: Path | None) -> None:
    """Point inductor's on-disk caches at `cache_dir` (created if missing) before compiling."""
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir.resolve())


class FastPath:
    """The fast paths applied to one model replica; `warm_up` compiles its shapes."""

    def __init__(self, model: torch.nn.Module, options: FastPathOptions) -> None:
        self.options = options
        self.compile = mode = options.compile
        self.quantize = options.quantize
        self.compiled: list[str] = []  # which modules run compiled
        self.warm_up_seconds = WARM_UP_SECONDS
        self._eager = threading.local()
        encoder = model.get_encoder()  # type: ignore[operator]
        if self.quantize == "int8":
            _quantize(encoder)
        if mode in ("encoder", "all"):
            _count_compiles()
            use_cache_dir(options.cache_dir)
            self._wrap(encoder, "encoder", self._encoder_eager)
            self.compiled.append("encoder")
        if mode == "all":
            self.compiled.extend(self._compile_decoder(model))

    @property
    def active(self) -> bool:
        return bool(self.compiled) or self.quantize != "off"

    def describe(self) -> str:
        """For the log: what runs how."""
        parts = [f"compiled: {', '.join(self.compiled) or 'nothing'}"]
        if self.quantize != "off":
            parts.append(f"quantized: encoder {self.quantize}")
        return "; ".join(parts)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run this thread's calls eagerly meanwhile (start-up probes of odd input sizes)."""
        before = getattr(self._eager, "on", False)
        self._eager.on = True
        try:
            yield
        finally:
            self._eager.on = before

    def _wrap(
        self,
        module: torch.nn.Module,
        name: str,
        eager_for: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None,
    ) -> None:
        """Replace `module.forward` (on this instance only) by a compiled version that falls
        back to the original where `eager_for(args, kwargs)` says so."""
        original = module.forward
        compiled = torch.compile(original, dynamic=True)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._eager, "on", False) or (eager_for and eager_for(args, kwargs)):
                with _stats_lock:
                    stats.eager_calls += 1
                return original(*args, **kwargs)
            # one graph whatever the caller spells out: flags left at their defaults
            # (`output_attentions=False`, `return_dict=True`, None) are dropped, else each
            # spelling (generate's, the adapter's own encoder call) compiles its own graph
            plain = {k: v for k, v in kwargs.items() if not _default(k, v)}
            return compiled(*args, **plain)

        module.forward = forward
        log.debug("compiling %s with dynamic shapes", name)

    @staticmethod
    def _encoder_eager(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if any(kwargs.get(flag) for flag in _EAGER_FLAGS):
            return True
        samples = kwargs.get("input_values", args[0] if args else None)
        # raw samples (wav2vec2 family): a short input runs eagerly; spectrogram inputs
        # (Whisper's fixed 30 s, Speech2Text's length buckets) always run compiled
        if not isinstance(samples, torch.Tensor) or samples.dim() != 2:
            return False
        return bool(samples.shape[-1] < MIN_COMPILED_SECONDS * 16_000)

    def _compile_decoder(self, model: torch.nn.Module) -> list[str]:
        """The decoder module as a whole, called by the generation loop as before (one step
        at a time, with transformers' growing KV cache: dynamic shapes again). A compiled step
        with a static KV cache needs the engine to own its loop: not done here."""
        decoder = getattr(model, "decoder", None)  # SpeechEncoderDecoderModel: a causal LM
        if decoder is None:
            decoder = model.get_decoder()  # type: ignore[operator]
        if not isinstance(decoder, torch.nn.Module):
            return []
        self._wrap(decoder, "decoder", self._decoder_eager)
        return ["decoder"]

    @staticmethod
    def _decoder_eager(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Steps of `generate` carry its KV cache; calls without one (word timings scoring
        whole token sequences) run eagerly rather than compile graphs of their own."""
        if any(kwargs.get(flag) for flag in _EAGER_FLAGS):
            return True
        return all(kwargs.get(name) is None for name in ("past_key_values", "cache"))


def _default(name: str, value: object) -> bool:
    """Whether a keyword argument says what leaving it out says."""
    if value is None:
        return True
    if name == "return_dict":
        return value is True
    return name in _EAGER_FLAGS and value is False


def _quantize(encoder: torch.nn.Module) -> None:
    """int8 for the encoder's linear layers: torchao's dynamic quantization (int8 weights,
    activations quantized per token at run time), the successor of the deprecated
    `torch.ao.quantization.quantize_dynamic` (4x slower than fp32 on this CPU).

    torchao is an optional extra (`pip install 'speech-serve[int8]'`): once installed,
    transformers imports it in every process that loads a model (about 1.3 s and a few
    warnings at import), so the service does not pull it in unless asked to."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise StartupError(
            "STT_QUANTIZE=int8 needs torchao: pip install 'speech-serve[int8]' (or torchao==0.18.0)"
        ) from exc
    quantize_(encoder, Int8DynamicActivationInt8WeightConfig())


def apply(model: torch.nn.Module, options: FastPathOptions) -> FastPath:
    """Apply `options` to a loaded, eval-mode model; the hook the adapter calls after loading."""
    return FastPath(model, options)
