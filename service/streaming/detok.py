"""Turn generated token ids, one at a time, into text deltas a client can append.

Decoding each token on its own is wrong: byte-level BPE splits a multi-byte character over
several tokens, and word-piece decoders join "##" pieces to the previous word and put spaces
between words. Decoding the whole sequence at every step is right but costs O(n) per token.
`IncrementalDetokenizer` decodes a short window instead, the previous token(s) plus the new ones,
and emits what the new ones add: the prefix_offset/read_offset technique of vLLM and
text-generation-inference (`detokenize_incrementally`, `Model.decode_token`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # transformers is heavy; the streaming package imports without it
    from transformers import PreTrainedTokenizerBase

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT: Final = "\ufffd"
"""What lossy UTF-8 decoding puts for an incomplete character: the end of the text may still be
the first bytes of a character whose remaining bytes come in the next tokens."""


class IncrementalDetokenizer:
    """Stream the text of one generated sequence as deltas, token by token.

    Contract: for any token ids t1..tn, the concatenation of push(t1), ..., push(tn), finish()
    equals `tokenizer.decode([t1..tn], skip_special_tokens=True).strip()`, the text the batch
    path returns for the same tokens. Hence:

    - special tokens (`tokenizer.all_special_ids`) add nothing;
    - leading whitespace is dropped, and trailing whitespace is held back until text follows it
      (so the text never ends in a space that the final text would not have);
    - a delta never ends inside a multi-byte character: while the decoded text ends in U+FFFD
      (incomplete UTF-8) the new tokens' text is held back, so no delta contains U+FFFD unless
      the final text does too.

    This holds whenever decoding more tokens only appends to the text of the earlier ones (up
    to an incomplete character at the end), as the `tokenizers` decoders do: byte-level BPE
    (GPT-2, BART, Whisper), WordPiece (BERT) and Metaspace (SentencePiece). Two exceptions,
    neither met by the bundled tokenizers: transformers' optional Python post-pass
    `clean_up_tokenization_spaces` (off by default in transformers 5, never applied to BPE)
    rewrites " ' n" as "'n" across a token boundary; and the ByteFallback decoder (Llama-style
    <0xNN> tokens) turns a whole run of byte tokens into U+FFFD once it becomes invalid UTF-8,
    so after a model emits malformed bytes the deltas may show the run's valid start.

    Cost per token: one or two decodes of a window of a few tokens (the last emitted token(s)
    as context, then those held back), independent of the sequence length; memory is the window.
    `finish` resets the detokenizer for the next sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._special: frozenset[int] = frozenset(tokenizer.all_special_ids)
        self._reset()

    def _reset(self) -> None:
        self._window: list[int] = []  # context tokens (text emitted), then held-back tokens
        self._context = 0  # how many of the window's tokens are context
        self._context_text = ""  # decode(window[:context]), cached
        self._started = False  # whether non-whitespace text has been emitted
        self._held_space = ""  # trailing whitespace not yet emitted

    def push(self, token_id: int) -> str:
        """Add the next generated token; return the text it completes (often "")."""
        if token_id in self._special:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        if text.endswith(_REPLACEMENT) or len(text) <= len(self._context_text):
            return ""
        delta = text[len(self._context_text) :]
        # The window slides: the tokens just emitted become the context of the next ones.
        del self._window[: self._context]
        self._context = len(self._window)
        self._context_text = self._decode(self._window)
        return self._emit(delta)

    def finish(self) -> str:
        """End the sequence: return the text held back (an incomplete character included, as
        the full decode has it, but no trailing whitespace); then start afresh."""
        text = self._decode(self._window)
        delta = self._emit(text[len(self._context_text) :])
        self._reset()
        return delta

    def _emit(self, delta: str) -> str:
        """Drop leading whitespace of the sequence; hold trailing whitespace back."""
        if not self._started:
            delta = delta.lstrip()
        pending = self._held_space + delta
        body = pending.rstrip()
        if not body:
            self._held_space = pending
            return ""
        self._started = True
        self._held_space = pending[len(body) :]
        return body

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))
