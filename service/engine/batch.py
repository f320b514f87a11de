"""The engine's own decoding loop: a `Batch` of rows that advances one decoder step at a time.

As text-generation-inference's `Seq2SeqLMBatch`: a batch owns each row's encoder output, the
cross-attention keys/values and the self-attention KV cache (one `EncoderDecoderCache`, rows
along its first axis), the generated tokens and each row's own decoding state (logits
processors, random generator, stopping, token sink). `from_rows` makes a batch of newly encoded
rows, `step` runs one decoder forward over every row, `filter` drops rows that left (finished,
cancelled, past their deadline) and frees their memory, `concatenate` merges newly started rows
into a running batch. Rows joined at different steps have histories of different lengths: the
cache is padded on the left (masked), the encoder frames on the right (masked), and each row
gets its own positions (`ModelAdapter.decoder_step`), so a row decodes as it would alone.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from service.engine.adapter import ModelAdapter, TokenSink
from service.engine.types import GenerationParams


@dataclasses.dataclass(eq=False)
class Row:
    """One request inside a batch: its decoding state from the prompt to the end."""

    params: GenerationParams
    ids: list[int]  # the decoder prompt, then every generated token
    prompt_length: int
    processors: Any  # a `LogitsProcessorList`, this row's alone
    eos: set[int]
    max_length: int  # prompt + max_new_tokens
    hidden: torch.Tensor | None  # encoder output (frames x dim) until the row joins a batch
    input_length: int  # model input (samples or feature frames) the encoder mask covers
    frames: int  # encoder frames (the row's share of the cross-attention keys/values)
    not_text: Callable[[int], bool]
    sink: TokenSink | None = None
    generator: torch.Generator | None = None
    job: Any = None  # what the row serves (the worker's job); opaque here
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finished: bool = False
    steps: int = 0  # decoder steps the row took part in
    companions: int = 0  # rows in the largest step it shared

    @classmethod
    def start(
        cls,
        adapter: ModelAdapter,
        params: GenerationParams,
        encoded: tuple[torch.Tensor, int],
        *,
        sink: TokenSink | None = None,
        job: Any = None,
    ) -> "Row":
        """A row ready to join a batch: `encoded` is its `ModelAdapter.encode` output."""
        prompt, processors, eos, max_length = adapter.decoding_setup(params)
        generator = None
        if params.do_sample and params.seed is not None:
            # the row's own random stream: its samples do not depend on its companions, and
            # equal `generate`'s after `torch.manual_seed(seed)` on the request alone
            generator = torch.Generator(adapter.device).manual_seed(params.seed)
        hidden, length = encoded
        return cls(
            params=params,
            ids=list(prompt),
            prompt_length=len(prompt),
            processors=processors,
            eos=eos,
            max_length=max_length,
            hidden=hidden,
            input_length=length,
            frames=int(hidden.shape[0]),
            not_text=adapter._not_text,
            sink=sink,
            generator=generator,
            job=job,
        )

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_length :]

    def choose(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's logits (1 x vocabulary, float32) as `generate`
        does: processors and warpers on the row's own ids, then argmax or a draw."""
        ids = torch.tensor([self.ids], device=logits.device)
        scores = self.processors(ids, logits)
        if self.params.do_sample:
            probs = functional.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])
        else:
            token = int(scores[0].argmax())
        logprob = float(scores[0].log_softmax(-1)[token])
        self.ids.append(token)
        self.logprobs.append(logprob)
        if token in self.eos:
            self.finished = True
            return
        if self.sink is not None and not self.not_text(token):
            self.sink(token, round(logprob, 4))
        if len(self.ids) >= self.max_length:
            self.finished = True


Layers = list[tuple[torch.Tensor, torch.Tensor]]


def _dynamic(layers: Layers) -> DynamicCache:
    """A `DynamicCache` holding these per-layer keys and values as they are (no copy)."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _layers(cache: Any) -> Layers:
    """The per-layer keys and values of a `DynamicCache` (the tensors themselves)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class Batch:
    """Rows that decode together, one step at a time."""

    def __init__(
        self,
        adapter: ModelAdapter,
        rows: list[Row],
        hidden: torch.Tensor,
        input_mask: torch.Tensor,
        self_mask: torch.Tensor,
        cache: EncoderDecoderCache | None,
    ) -> None:
        self.adapter = adapter
        self.rows = rows
        self.hidden = hidden  # rows x frames x dim, padded on the right
        self.input_mask = input_mask  # rows x model-input length: 1 where the row has input
        self.self_mask = self_mask  # rows x cached positions: 1 where the row has a token
        self.cache = cache  # None until the first step (the prefill)
        self.model_seconds = 0.0  # the last step's decoder forward alone (the rest: Python)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_rows(cls, adapter: ModelAdapter, rows: Sequence[Row]) -> "Batch":
        """A batch of rows that have not decoded yet (all with prompts of one length)."""
        if len({row.prompt_length for row in rows}) != 1:
            raise ValueError("rows of one new batch must have prompts of one length")
        states = [row.hidden for row in rows]
        if any(state is None for state in states):
            raise ValueError("a row joins a batch once, right after it is encoded")
        frames = max(state.shape[0] for state in states if state is not None)
        first = states[0]
        assert first is not None
        hidden = first.new_zeros((len(rows), frames, first.shape[-1]))
        length = max(row.input_length for row in rows)
        input_mask = torch.zeros((len(rows), length), dtype=torch.long, device=adapter.device)
        for index, row in enumerate(rows):
            assert row.hidden is not None
            hidden[index, : row.hidden.shape[0]] = row.hidden
            input_mask[index, : row.input_length] = 1
            row.hidden = None  # the batch holds it now
        self_mask = torch.zeros((len(rows), 0), dtype=torch.long, device=adapter.device)
        return cls(adapter, list(rows), hidden, input_mask, self_mask, None)

    @torch.inference_mode()
    def step(self) -> None:
        """One decoder forward over every row; each row gets its next token (or finishes).

        All or nothing: if the forward raises, the batch is left as it was, so the caller may
        retry its rows in smaller batches (fault bisection, out of memory).
        """
        device = self.adapter.device
        if self.cache is None:  # the prefill: every row's prompt, nothing cached
            ids = torch.tensor([row.ids for row in self.rows], device=device)
        else:
            ids = torch.tensor([[row.ids[-1]] for row in self.rows], device=device)
        width = ids.shape[1]
        positions = self.adapter.step_positions([row.ids for row in self.rows], width)
        ones = torch.ones((len(self.rows), width), dtype=torch.long, device=device)
        mask = torch.cat([self.self_mask, ones], dim=1)
        saved = _layers(self.cache.self_attention_cache) if self.cache is not None else None
        started = time.perf_counter()
        try:
            logits, cache = self.adapter.decoder_step(
                ids, positions, mask, self.hidden, self.input_mask, self.cache
            )
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            self.model_seconds = time.perf_counter() - started
        except BaseException:
            if self.cache is not None and saved is not None:
                self.cache.self_attention_cache.layers = _dynamic(saved).layers
            raise
        self.cache, self.self_mask = cache, mask
        for index, row in enumerate(self.rows):
            row.choose(logits[index : index + 1])
            row.steps += 1
            row.companions = max(row.companions, len(self.rows))

    def filter(self, keep: Sequence[Row]) -> "Batch | None":
        """A batch of the rows in `keep` only (None if empty); padding no row needs any more is
        cut, and the memory of the rows left out is freed with this batch. `self` is unchanged."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor([self.rows.index(row) for row in keep], device=self.self_mask.device)
        self_mask = self.self_mask[index]
        start = int((self_mask.sum(dim=0) == 0).long().cumprod(0).sum())  # all-padding columns
        self_mask = self_mask[:, start:]
        input_mask = self.input_mask[index]
        length = int(input_mask.sum(dim=1).max())
        input_mask = input_mask[:, :length]
        frames = max(row.frames for row in keep)
        hidden = self.hidden[index, :frames]
        cache = None
        if self.cache is not None:
            own_layers = _layers(self.cache.self_attention_cache)
            cross_layers = _layers(self.cache.cross_attention_cache)
            own = [(k[index, :, start:], v[index, :, start:]) for k, v in own_layers]
            cross = [(k[index, :, :frames], v[index, :, :frames]) for k, v in cross_layers]
            cache = EncoderDecoderCache(_dynamic(own), _dynamic(cross))
        return Batch(self.adapter, list(keep), hidden, input_mask, self_mask, cache)

    @staticmethod
    def concatenate(batches: Sequence["Batch"]) -> "Batch":
        """One batch of the rows of `batches`, all stepped at least once."""
        if len(batches) == 1:
            return batches[0]
        if any(batch.cache is None for batch in batches):
            raise ValueError("only batches that have taken their first step can be merged")
        steps = max(batch.self_mask.shape[1] for batch in batches)
        frames = max(batch.hidden.shape[1] for batch in batches)
        length = max(batch.input_mask.shape[1] for batch in batches)

        def left(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
            pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [size - x.shape[dim], 0]
            return functional.pad(x, pad)

        def right(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
            pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, size - x.shape[dim]]
            return functional.pad(x, pad)

        caches = [batch.cache for batch in batches]
        own = [_layers(c.self_attention_cache) for c in caches if c is not None]
        cross = [_layers(c.cross_attention_cache) for c in caches if c is not None]
        merged_own = [
            (
                torch.cat([left(layer[i][0], steps, 2) for layer in own]),
                torch.cat([left(layer[i][1], steps, 2) for layer in own]),
            )
            for i in range(len(own[0]))
        ]
        merged_cross = [
            (
                torch.cat([right(layer[i][0], frames, 2) for layer in cross]),
                torch.cat([right(layer[i][1], frames, 2) for layer in cross]),
            )
            for i in range(len(cross[0]))
        ]
        return Batch(
            batches[0].adapter,
            [row for batch in batches for row in batch.rows],
            torch.cat([right(b.hidden, frames, 1) for b in batches]),
            torch.cat([right(b.input_mask, length, 1) for b in batches]),
            torch.cat([left(b.self_mask, steps, 1) for b in batches]),
            EncoderDecoderCache(_dynamic(merged_own), _dynamic(merged_cross)),
        )
