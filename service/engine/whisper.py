"""What the adapter must know about Whisper checkpoints, in one place.

Whisper differs from the other speech seq2seq models in four ways the service must honour:
its extractor pads every input to 30 s of log-mel frames (the encoder's positions are fixed, so a
window may not be longer); its decoder prompt carries the language and the task
(`<|startoftranscript|><|de|><|transcribe|><|notimestamps|>`), the language being detected from
the audio when it is not given; a prompt is passed as `<|startofprev|>` context tokens; and
English-only checkpoints (`is_multilingual=False`, the `.en` models) take neither a language nor
a task (`generate` raises if either is passed) and cannot translate.

The generation config must be in the current format (`is_multilingual`, `lang_to_id`,
`task_to_id`, `no_timestamps_token_id`, as `openai/whisper-*` checkpoints ship it since 2023);
an older one (only `forced_decoder_ids`) is refused at start-up with one message that names
what is missing, rather than failing at the first request.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.engine.timestamps import TimedSegment, parse_segments
from service.engine.types import GenerationParams
from service.errors import InvalidRequest, StartupError, Unsupported

_PROMPT_START_TOKENS = 4  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>


class WhisperSupport:
    """Language and task handling, prompt and input limits for one Whisper checkpoint."""

    def __init__(self, model: Any, tokenizer: Any, feature_extractor: Any, where: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        gen = model.generation_config
        missing = [
            attr
            for attr in ("is_multilingual", "no_timestamps_token_id")
            if getattr(gen, attr, None) is None
        ]
        declared = getattr(gen, "is_multilingual", None)
        # an old config does not say: the vocabulary does (English-only: 51,864 tokens)
        self.multilingual = bool(declared) if declared is not None else len(tokenizer) > 51_864
        if self.multilingual:
            missing += [a for a in ("lang_to_id", "task_to_id") if not getattr(gen, a, None)]
        if missing:
            raise StartupError(
                f"the Whisper generation config of {where} is missing {', '.join(missing)} "
                "(an older format: only `forced_decoder_ids`). Copy generation_config.json from "
                "the openai/whisper-* checkpoint of the same size (the `.en` one for an "
                "English-only model), or regenerate it as "
                "https://github.com/huggingface/transformers/issues/25084 describes"
            )
        self._check_ids(gen, tokenizer, where)
        lang_to_id: dict[str, int] = dict(getattr(gen, "lang_to_id", None) or {})
        # "<|de|>" → "de"; the id → the code, to read the language a prompt used
        self.languages = {token.strip("<|>"): i for token, i in lang_to_id.items()}
        self.language_of_id = {i: code for code, i in self.languages.items()}
        self.max_input_seconds = float(
            feature_extractor.n_samples / feature_extractor.sampling_rate
        )
        self.max_target_positions = int(model.config.max_target_positions)
        # every token from <|endoftext|> on is special, a language, a task or a timestamp
        self.first_special = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        # <|0.00|>: the first timestamp token, right after <|notimestamps|>
        self.timestamp_begin = int(gen.no_timestamps_token_id) + 1

    @staticmethod
    def _check_ids(gen: Any, tokenizer: Any, where: str) -> None:
        """The config's special ids must be the tokenizer's: a generation config copied from
        another Whisper generation (large-v3 added a language, shifting every id after it)
        would force the wrong tokens, silently."""
        named: dict[str, int] = {
            "<|startoftranscript|>": gen.decoder_start_token_id,
            "<|notimestamps|>": gen.no_timestamps_token_id,
            **{f"<|{task}|>": i for task, i in (getattr(gen, "task_to_id", None) or {}).items()},
            **dict(getattr(gen, "lang_to_id", None) or {}),
        }
        wrong = [
            f"{token}={given} (the tokenizer has {tokenizer.convert_tokens_to_ids(token)})"
            for token, given in named.items()
            if tokenizer.convert_tokens_to_ids(token) != given
        ]
        if wrong:
            raise StartupError(
                f"the Whisper generation config of {where} does not match its tokenizer: "
                f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. Use the "
                "generation_config.json of the same openai/whisper-* checkpoint"
            )

    @property
    def can_translate(self) -> bool:
        return self.multilingual and "translate" in (self.model.generation_config.task_to_id or {})

    def validate(self, params: GenerationParams) -> None:
        """Refuse what this checkpoint cannot do (400s naming the parameter)."""
        if params.task == "translate":
            if not self.can_translate:
                raise Unsupported(
                    "this Whisper model is English-only: it cannot translate", param="model"
                )
            if params.language not in (None, "en"):
                raise InvalidRequest(
                    f"Whisper translates into English only, not {params.language!r}",
                    param="language",
                )
            return
        if params.language is None:
            return
        if not self.multilingual:
            if params.language != "en":
                raise InvalidRequest(
                    f"this Whisper model is English-only: language {params.language!r} "
                    "is not supported",
                    param="language",
                )
        elif params.language not in self.languages:
            raise InvalidRequest(
                f"unknown language {params.language!r} for this Whisper model; it knows "
                f"{', '.join(sorted(self.languages))}",
                param="language",
            )

    def generate_kwargs(self, params: GenerationParams, device: torch.device) -> dict[str, Any]:
        """`task`, `language` and `prompt_ids` for `generate`, and the room left for new tokens.

        English-only models get none of task or language. A translation's `language` is its
        target (always English): the source language is detected.
        """
        kwargs: dict[str, Any] = {}
        if self.multilingual:
            kwargs["task"] = params.task
            if params.language and params.task == "transcribe":
                kwargs["language"] = params.language
        prompt = 0
        if params.prompt:
            ids = self.tokenizer.get_prompt_ids(params.prompt, return_tensors="pt")
            # OpenAI keeps the last n_ctx/2 - 1 tokens of the prompt (<|startofprev|> first)
            keep = self.max_target_positions // 2 - 1
            if ids.shape[-1] > keep + 1:
                ids = torch.cat([ids[:1], ids[-keep:]])
            kwargs["prompt_ids"] = ids.to(device)
            prompt = int(ids.shape[-1])
        kwargs["max_new_tokens"] = self.max_target_positions - _PROMPT_START_TOKENS - prompt
        if params.timestamps:
            # no <|notimestamps|>, and Whisper's timestamp rules while decoding
            # (WhisperTimeStampLogitsProcessor); one `generate` call for the window, so the
            # result keeps its per-step scores like any other
            kwargs["return_timestamps"] = True
            kwargs["force_unique_generate_call"] = True
        return kwargs

    def segments(
        self, generated: Sequence[int], logprobs: Sequence[float], eos_ids: set[int]
    ) -> list[TimedSegment]:
        """A row's segments from its generated ids (up to end of text), as its timestamp
        tokens delimit them (`timestamps.parse_segments`)."""
        ids: list[int] = []
        scores: list[float] = []
        for token, score in zip(generated, logprobs, strict=True):
            if token in eos_ids:
                break
            ids.append(int(token))
            scores.append(round(float(score), 4) if np.isfinite(score) else 0.0)
        return parse_segments(
            ids,
            timestamp_begin=self.timestamp_begin,
            first_special=self.first_special,
            logprobs=scores,
            decode=lambda t: str(self.tokenizer.decode(t, skip_special_tokens=True)),
        )

    def language_used(self, prefix: list[int], params: GenerationParams) -> str | None:
        """The language a row was decoded in: the language token of its decoder prompt
        (forced or detected), English for English-only models and for translations."""
        if params.task == "translate" or not self.multilingual:
            return "en"
        for token in prefix:
            if token in self.language_of_id:
                return self.language_of_id[token]
        return params.language
