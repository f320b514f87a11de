"""IncrementalDetokenizer on the bundled model's word-level BERT tokenizer and on tokenizers built
here (no hub downloads): word-piece with "##" pieces, GPT-2/BART byte-level BPE, a byte-level BPE
trained on multi-byte text, and a SentencePiece-style BPE with byte fallback."""

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase
from transformers import PreTrainedTokenizerFast as FastTokenizer

from service.streaming.detok import IncrementalDetokenizer
from tests.checkpoints import bart_tokenizer, gpt2_tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "model_store" / "w2v2-bert-commands-en"
MULTILINGUAL = [
    "héllo wörld 日本語 🎉 naïve café",
    "日本語のテキスト 🎉🎉 über straße",
    "the quick brown fox, don't stop. ok?",
    "ünïcödé ☕ €100 — “quotes” 한국어",
]
WORDS = [
    *" ".join(MULTILINGUAL).split(),
    "hello", "world", "the", "a", "and", "lights", "on", "de", "x", ",", ".", "'", "n't",
    "🎉", "日本", "語", "é", "ö", "☕",
]  # fmt: skip
REPLACEMENT = "\ufffd"


def wordpiece(root: Path) -> PreTrainedTokenizerBase:
    """BERT with "##" continuation pieces and punctuation."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hel", "##lo", "wor", "##ld", "the",
             "a", "##b", "##s", "light", "do", "n", "##'t", "'", ".", ",", "?", "on", "off",
             "caf", "##e", "x", "##x"]  # fmt: skip
    path = root / "wordpiece-vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(path), do_lower_case=True)


def trained_byte_bpe(root: Path) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained on multi-byte text with a small vocabulary: some characters are
    one token, others span two to four, and some tokens end part-way into a character."""
    del root
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(MULTILINGUAL * 3, trainer)
    return FastTokenizer(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def sentencepiece_bpe(root: Path) -> PreTrainedTokenizerBase:
    """Llama-style: "▁" for spaces (Metaspace), unknown characters as <0xNN> byte tokens."""
    del root
    model = Tokenizer(models.BPE(byte_fallback=True))
    model.normalizer = normalizers.Replace(" ", "▁")
    model.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    model.train_from_iterator(["hello world the quick brown fox héllo naïve"] * 5, trainer)
    spec = json.loads(model.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte tokens are ordinary (not special) vocabulary, as in Llama
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return FastTokenizer(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip


BUILDERS: dict[str, Callable[[Path], PreTrainedTokenizerBase]] = {
    "bundled-bert": lambda root: AutoTokenizer.from_pretrained(BUNDLED),
    "wordpiece": wordpiece,
    "gpt2": gpt2_tokenizer,
    "bart": bart_tokenizer,
    "trained-byte-bpe": trained_byte_bpe,
    "sentencepiece-bpe": sentencepiece_bpe,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> PreTrainedTokenizerBase:
    root = tmp_path_factory.mktemp(request.param)
    return BUILDERS[request.param](root)


def stream(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Every delta, finish() included."""
    detok = IncrementalDetokenizer(tokenizer)
    return [*(detok.push(i) for i in ids), detok.finish()]


def expected(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


def random_ids(tokenizer: PreTrainedTokenizerBase, rng: random.Random) -> list[int]:
    """Up to 40 random token ids, specials included. Byte-fallback tokens come only as whole
    characters: that decoder rewrites a run of them that turns invalid (see the contract)."""
    vocab = tokenizer.get_vocab()
    if "<0x41>" not in vocab:
        return [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 40))]
    byte_tokens = {i for token, i in vocab.items() if token.startswith("<0x")}
    others = [i for i in range(len(tokenizer)) if i not in byte_tokens]
    ids: list[int] = []
    for _ in range(rng.randrange(0, 25)):
        if rng.random() < 0.7:
            ids.append(rng.choice(others))
        else:
            char = rng.choice("é日本語🎉ß☕한")
            ids.extend(vocab[f"<0x{b:02X}>"] for b in char.encode())
    return ids


def test_random_token_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    """Any ids at all, specials and malformed UTF-8 included: the deltas add up to the full
    decode."""
    rng = random.Random(0)
    for _ in range(200):
        ids = random_ids(tokenizer, rng)
        assert "".join(stream(tokenizer, ids)) == expected(tokenizer, ids), ids


def test_random_text_never_shows_a_broken_character(tokenizer: PreTrainedTokenizerBase) -> None:
    """Real text (multi-byte characters, punctuation, odd spacing) with specials in between: the
    deltas add up to the full decode and none of them contains U+FFFD."""
    rng = random.Random(1)
    specials = tokenizer.all_special_ids
    for _ in range(150):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(1, 12))]
        text = (
            rng.choice(["", " ", "  "])
            + rng.choice([" ", "  ", ""]).join(words)
            + rng.choice(["", " "])
        )
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        for _ in range(rng.randrange(0, 4)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        full = expected(tokenizer, ids)
        assert REPLACEMENT not in full
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == full, (text, ids)
        assert not any(REPLACEMENT in delta for delta in deltas), (text, deltas)


def test_cost_per_token_does_not_grow(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decode covers a short window, however long the sequence."""
    decode = tokenizer.decode
    sizes: list[int] = []

    def counting(ids: list[int], **kwargs: object) -> str:
        sizes.append(len(ids))
        return str(decode(ids, **kwargs))

    text = " ".join([*MULTILINGUAL, "turn on the lights in the kitchen"] * 10)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    assert sum(i not in tokenizer.all_special_ids for i in ids) >= 60
    monkeypatch.setattr(tokenizer, "decode", counting)
    deltas = stream(tokenizer, ids)
    monkeypatch.undo()
    assert "".join(deltas) == expected(tokenizer, ids)
    assert max(sizes) <= 8  # a character spans at most four tokens: four held, four of context
    assert len(sizes) <= 2 * len(ids) + 1


def test_multi_byte_characters_are_held_until_complete(tmp_path: Path) -> None:
    tokenizer = gpt2_tokenizer(tmp_path)  # no merges of non-ASCII bytes: one token per byte
    ids = list(tokenizer.encode("日本 🎉"))
    assert len(ids) == 3 + 3 + 1 + 4
    assert stream(tokenizer, ids) == ["", "", "日", "", "", "本", "", "", "", "", " 🎉", ""]


def test_whitespace_at_the_ends_is_dropped_and_kept_in_between(tmp_path: Path) -> None:
    tokenizer = gpt2_tokenizer(tmp_path)
    ids = list(tokenizer.encode("  the  world "))
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "the  world"
    assert not deltas[-2].endswith(" ")  # the trailing space was held back, then dropped
    assert all(not d or not d[-1].isspace() for d in deltas)


def test_word_pieces_join_and_words_are_spaced(tmp_path: Path) -> None:
    tokenizer = wordpiece(tmp_path)
    pieces = ["hel", "##lo", "wor", "##ld", "[SEP]", ".", "do", "n", "##'t", "[PAD]"]
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert stream(tokenizer, ids) == ["hel", "lo", " wor", "ld", "", ".", " do", " n", "'t", "", ""]
    assert expected(tokenizer, ids) == "hello world. do n't"


def test_bundled_tokenizer_and_reuse_after_finish() -> None:
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    detok = IncrementalDetokenizer(tokenizer)
    first = tokenizer.encode("turn on the lights")  # [CLS] ... [SEP]
    assert [detok.push(i) for i in first] + [detok.finish()] == [
        "",
        "turn",
        " on",
        " the",
        " lights",
        "",
        "",
    ]
    second = tokenizer.encode("open the door", add_special_tokens=False)
    assert "".join([detok.push(i) for i in second] + [detok.finish()]) == "open the door"
