"""Tiny random-weight speech-to-text checkpoints, built locally (no model hub) for tests.

`build_checkpoint(kind, out_dir)` writes a folder that loads with `from_pretrained` and serves as
is: model weights, config, generation config, feature extractor and tokenizer side by side.
Every model is about 70k parameters (width 32, two layers a side) and generates 8 tokens for
one second of audio in a few tens of milliseconds on a CPU.

The token ids (`decoder_start_token_id`, `pad_token_id`, `eos_token_id`) agree between the
tokenizer, `model.config` and `model.generation_config`, so `model.generate(**features)` needs no
extra arguments. The output-projection rows of EOS and the other special tokens are zeroed (and
their bias lowered where the head has one), so the random decoders emit words instead of
stopping at once: they always run to `max_new_tokens`.
"""

import base64
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    BartConfig,
    BartTokenizer,
    BertConfig,
    BertTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2Tokenizer,
    HubertConfig,
    MBart50Tokenizer,
    MBartConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Speech2TextConfig,
    Speech2TextFeatureExtractor,
    Speech2TextForConditionalGeneration,
    SpeechEncoderDecoderConfig,
    SpeechEncoderDecoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES as WHISPER_LANGUAGES

KINDS = (
    "wav2vec2-bert",
    "hubert-gpt2",
    "wav2vec2-bart",
    "speech2text",
    "wav2vec2-groupnorm-bert",
    "wav2vec2-mbart50",
    "whisper",
    "whisper-en",
)
WHISPER_KINDS = ("whisper", "whisper-en")

MAX_NEW_TOKENS = 8
HIDDEN = 32
# Weights drawn with std 0.1 (transformers uses 0.02) and untied output projections make the
# random decoders depend on the audio: different clips give different text.
INIT_STD = 0.1
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = (
    "the", "a", "and", "of", "to", "in", "is", "it", "that", "for",
    "on", "with", "as", "was", "at", "by", "this", "from", "or", "be",
    "hello", "world", "yes", "no", "one", "two", "three", "speech", "text", "test",
)  # fmt: skip
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
# Byte-level BPE merges (GPT-2 / BART): "Ġ" is the byte-level symbol for a leading space.
MERGES = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("o", "r"),
    ("e", "r"), ("Ġ", "w"), ("l", "l"), ("Ġ", "s"), ("e", "s"), ("Ġa", "nd"), ("n", "d"),
)  # fmt: skip


# --------------------------------------------------------------------------------- tokenizers


def bert_tokenizer(out_dir: Path) -> BertTokenizer:
    """A WordPiece tokenizer from `vocab.txt`: BERT's specials, common words and the letters.

    Words outside the vocabulary become [UNK]; the letters are there for spelling-style output.
    """
    vocab = [*BERT_SPECIALS, *WORDS, *(c for c in LETTERS if c not in WORDS)]
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5: `vocab` takes the file path; a `vocab_file=` keyword is silently ignored.
    return BertTokenizer(vocab=str(out_dir / "vocab.txt"), do_lower_case=True)


def byte_level_files(
    out_dir: Path, specials: tuple[str, ...], trailing: tuple[str, ...] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Write `vocab.json` and `merges.txt` for a byte-level BPE: the specials, all 256 byte
    symbols (so any text round-trips), one token per merge and the trailing specials."""
    vocab: dict[str, int] = {}
    for token in (*specials, *byte_symbols(), *(a + b for a, b in MERGES), *trailing):
        vocab.setdefault(token, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in MERGES)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab, list(MERGES)


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(ByteLevel.alphabet())
    return [table[b] for b in range(256)]


def gpt2_tokenizer(out_dir: Path) -> GPT2Tokenizer:
    """GPT-2 style: `<|endoftext|>` is BOS, EOS, UNK and (for batching) PAD."""
    vocab, merges = byte_level_files(out_dir, ("<|endoftext|>",))
    # transformers 5: merges are (a, b) tuples; "a b" strings raise in `tokenizers.BPE`.
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")


def bart_tokenizer(out_dir: Path) -> BartTokenizer:
    """BART style: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then bytes and merges, `<mask>` last."""
    vocab, merges = byte_level_files(out_dir, ("<s>", "<pad>", "</s>", "<unk>"), ("<mask>",))
    return BartTokenizer(vocab=vocab, merges=merges)


# A few sentences in three of mBART-50's languages: the multilingual tokenizer's training text.
MULTILINGUAL_TEXT = (
    "turn on the lights", "three four five", "set a timer for ten minutes", "call home",
    "schalte das licht ein", "drei vier fünf", "stelle einen timer für zehn minuten",
    "allume la lumière", "trois quatre cinq", "règle une minuterie de dix minutes",
)  # fmt: skip


def mbart50_tokenizer() -> MBart50Tokenizer:
    """An mBART-50 tokenizer over a Unigram model (sentencepiece's algorithm) trained here.

    `tokenizers`' Unigram trainer needs no `sentencepiece` package. `MBart50Tokenizer` lays the
    vocabulary out as fairseq does: <s>=0, <pad>=1, </s>=2, <unk>=3, the pieces, then the 52
    language codes (`de_DE`, `en_XX`, ...) and <mask>, so language ids never overlap pieces.
    """
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"
    )
    unigram.train_from_iterator([*MULTILINGUAL_TEXT, *WORDS] * 20, trainer)
    vocab = json.loads(unigram.to_str())["model"]["vocab"]  # [piece, log-probability] rows
    return MBart50Tokenizer(vocab=[(piece, score) for piece, score in vocab])


def mbart_decoder(vocab_size: int) -> MBartConfig:
    return MBartConfig(
        vocab_size=vocab_size,
        d_model=HIDDEN,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=2 * HIDDEN,
        encoder_layers=2,  # generate() sizes the KV cache with num_hidden_layers (see BART)
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * HIDDEN,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        init_std=INIT_STD,
        scale_embedding=False,
        tie_word_embeddings=False,
        is_decoder=True,
        add_cross_attention=True,
    )


# ------------------------------------------------------------------------- feature extractors


def wav2vec2_feature_extractor(attention_mask: bool) -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    )


def speech2text_feature_extractor() -> Speech2TextFeatureExtractor:
    return Speech2TextFeatureExtractor(
        feature_size=80, num_mel_bins=80, sampling_rate=16_000, return_attention_mask=True
    )


# ---------------------------------------------------------------------------------- encoders


def conv_front_end() -> dict:
    """Three conv layers with a 5 * 8 * 8 = 320-sample hop (50 frames a second, as wav2vec2)."""
    return {
        "conv_dim": (HIDDEN, HIDDEN, HIDDEN),
        "conv_kernel": (10, 8, 8),
        "conv_stride": (5, 8, 8),
        "conv_bias": True,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    }


def tiny_encoder_sizes() -> dict:
    return {
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 2 * HIDDEN,
        "mask_time_prob": 0.05,
        "mask_time_length": 2,
        "layerdrop": 0.0,
        "vocab_size": 32,
        "initializer_range": INIT_STD,
    }


def wav2vec2_config(layer_norm: bool) -> Wav2Vec2Config:
    """Layer norm (stable layer norm, takes an attention mask) or wav2vec2-base's group norm."""
    return Wav2Vec2Config(
        **tiny_encoder_sizes(),
        **conv_front_end(),
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
    )


def hubert_config() -> HubertConfig:
    return HubertConfig(
        **tiny_encoder_sizes(),
        **conv_front_end(),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )


# ---------------------------------------------------------------------------------- decoders


def bert_decoder(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=64,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        is_decoder=True,
        add_cross_attention=True,
    )


def gpt2_decoder(vocab_size: int, eos: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_inner=2 * HIDDEN,
        n_positions=64,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        is_decoder=True,
        add_cross_attention=True,
    )


def bart_decoder(vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> BartConfig:
    return BartConfig(
        vocab_size=vocab_size,
        d_model=HIDDEN,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=2 * HIDDEN,
        # BartConfig.num_hidden_layers is encoder_layers: generate() sizes the decoder's KV
        # cache with it, so it must equal decoder_layers even though BartForCausalLM has no encoder.
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * HIDDEN,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=None,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        is_decoder=True,
        add_cross_attention=True,
    )


# ---------------------------------------------------------------------------------- building


BERT_VOCAB_KINDS = ("wav2vec2-bert", "wav2vec2-groupnorm-bert", "speech2text")


def generation_ids(kind: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """[CLS] ... [SEP] for the word-piece vocab; `</s>` ... `</s>` for BART (as BART does);
    `<|endoftext|>` ... `<|endoftext|>` for GPT-2, which pads with EOS too."""
    if kind in ("wav2vec2-bart", "wav2vec2-mbart50"):  # mBART-50 starts with </s> too
        start = tokenizer.eos_token_id
    elif tokenizer.cls_token_id is not None:
        start = tokenizer.cls_token_id
    else:
        start = tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if kind in BERT_VOCAB_KINDS else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if start is None or eos is None or pad is None:
        raise ValueError(f"{kind}: tokenizer lacks a start, end or pad token")
    return {"decoder_start_token_id": start, "pad_token_id": pad, "eos_token_id": eos}


def speech_encoder_decoder(
    encoder: PretrainedConfig, decoder: PretrainedConfig
) -> SpeechEncoderDecoderModel:
    config = SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    return SpeechEncoderDecoderModel(config=config)


def speech2text_model(vocab_size: int, ids: dict[str, int]) -> Speech2TextForConditionalGeneration:
    config = Speech2TextConfig(
        vocab_size=vocab_size,
        d_model=HIDDEN,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * HIDDEN,
        decoder_ffn_dim=2 * HIDDEN,
        conv_channels=HIDDEN,
        num_conv_layers=2,
        conv_kernel_sizes=(5, 5),
        input_feat_per_channel=80,
        input_channels=1,
        scale_embedding=False,  # sqrt(d_model) on token embeddings drowns the audio out
        max_source_positions=1500,  # 30 s of 10 ms frames after the 4x conv subsampling
        max_target_positions=64,
        init_std=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=ids["decoder_start_token_id"],
        **ids,
    )
    return Speech2TextForConditionalGeneration(config)


def suppressed_ids(tokenizer: PreTrainedTokenizerBase, eos: int) -> list[int]:
    """Token ids the random decoder should (almost) never pick: EOS and the other specials, and
    in a byte-level vocabulary every token that is not lower-case letters with an optional
    leading space, so that decoded output is readable words rather than stray bytes."""
    ids = {eos, *tokenizer.all_special_ids}
    vocab = tokenizer.get_vocab()
    if "Ġ" in vocab:  # byte-level BPE
        readable = set(LETTERS) | {"Ġ"}
        ids.update(i for token, i in vocab.items() if not set(token) <= readable)
    return sorted(ids)


def discourage(model: PreTrainedModel, token_ids: list[int]) -> None:
    """Zero those rows of the (untied) output projection, and lower their bias where it has one:
    their logit is then 0 (or -1), below the best of the random logits of the other tokens."""
    head = model.get_output_embeddings()
    if head is None:
        head = model.decoder.get_output_embeddings()
    with torch.no_grad():
        head.weight[token_ids] = 0.0
        if getattr(head, "bias", None) is not None:
            head.bias[token_ids] = -1.0


def set_generation_ids(model: PreTrainedModel, ids: dict[str, int], bos: int | None) -> None:
    """The same ids on the config, the decoder's config and a fresh generation config."""
    for name, value in ids.items():
        setattr(model.config, name, value)
    decoder_config = getattr(model.config, "decoder", None)
    if decoder_config is not None:
        decoder_config.pad_token_id = ids["pad_token_id"]
        decoder_config.eos_token_id = ids["eos_token_id"]
    model.generation_config = GenerationConfig(
        **ids,
        bos_token_id=ids["decoder_start_token_id"] if bos is None else bos,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def build_checkpoint(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random checkpoint of `kind` (one of `KINDS`) into `out_dir`; returns it."""
    builders: dict[str, Callable[[Path], tuple]] = {
        "wav2vec2-bert": lambda d: (bert_tokenizer(d), wav2vec2_feature_extractor(True)),
        "wav2vec2-groupnorm-bert": lambda d: (bert_tokenizer(d), wav2vec2_feature_extractor(False)),
        "hubert-gpt2": lambda d: (gpt2_tokenizer(d), wav2vec2_feature_extractor(True)),
        "wav2vec2-bart": lambda d: (bart_tokenizer(d), wav2vec2_feature_extractor(True)),
        "speech2text": lambda d: (bert_tokenizer(d), speech2text_feature_extractor()),
        "wav2vec2-mbart50": lambda d: (mbart50_tokenizer(), wav2vec2_feature_extractor(True)),
    }
    if kind not in builders and kind not in WHISPER_KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind in WHISPER_KINDS:
        return build_whisper(kind, out_dir, seed)
    tokenizer, feature_extractor = builders[kind](out_dir)
    ids = generation_ids(kind, tokenizer)
    vocab_size = len(tokenizer)

    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "wav2vec2-bert":
        model = speech_encoder_decoder(wav2vec2_config(layer_norm=True), bert_decoder(vocab_size))
    elif kind == "wav2vec2-groupnorm-bert":
        model = speech_encoder_decoder(wav2vec2_config(layer_norm=False), bert_decoder(vocab_size))
    elif kind == "hubert-gpt2":
        decoder = gpt2_decoder(vocab_size, ids["eos_token_id"])
        model = speech_encoder_decoder(hubert_config(), decoder)
    elif kind == "wav2vec2-bart":
        decoder = bart_decoder(vocab_size, tokenizer)
        model = speech_encoder_decoder(wav2vec2_config(layer_norm=True), decoder)
    elif kind == "wav2vec2-mbart50":
        decoder = mbart_decoder(vocab_size)
        model = speech_encoder_decoder(wav2vec2_config(layer_norm=True), decoder)
    else:
        model = speech2text_model(vocab_size, ids)

    set_generation_ids(model, ids, tokenizer.bos_token_id)
    discourage(model, suppressed_ids(tokenizer, ids["eos_token_id"]))
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------------- Whisper
#
# A real Whisper tokenizer, built offline from the BPE ranks that OpenAI ship in the
# `openai-whisper` source package (`whisper/assets/*.tiktoken`): the same 50,257 (multilingual)
# or 50,256 (English-only, GPT-2's) byte-level tokens, then Whisper's special tokens and the
# 1,501 timestamp tokens in OpenAI's order, as `convert_openai_to_hf.py` in transformers 4.x
# built them. The source package (800 KB) is fetched once with pip from PyPI and cached: the
# repository stays small and nothing comes from a model hub.

WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_ASSETS = {  # file → sha256 (checked after download)
    "multilingual.tiktoken": "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126",
    "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}
WHISPER_CONTROL = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
)
WHISPER_MAX_NEW_TOKENS = 12


def whisper_assets_dir() -> Path:
    """The folder holding the two `.tiktoken` files, downloading the source package if needed.

    `STT_TEST_CACHE` (default `~/.cache/speech-serve-tests`) keeps them between runs.
    """
    cache = Path(os.environ.get("STT_TEST_CACHE", Path.home() / ".cache" / "speech-serve-tests"))
    assets = cache / "whisper-assets"
    if all(_sha256(assets / name) == digest for name, digest in WHISPER_ASSETS.items()):
        return assets
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             WHISPER_SDIST, "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in WHISPER_ASSETS and "/whisper/assets/" in member.name:
                    source = tar.extractfile(member)
                    assert source is not None
                    (assets / name).write_bytes(source.read())
    for name, digest in WHISPER_ASSETS.items():
        if _sha256(assets / name) != digest:
            raise RuntimeError(f"{WHISPER_SDIST}: {name} is missing or not the expected file")
    return assets


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def tiktoken_vocab_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A `.tiktoken` rank file as a byte-level BPE vocabulary and its merges (ordered by rank),
    the way `transformers.convert_slow_tokenizer.TikTokenConverter` derives them."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    symbols = byte_symbols()

    def text(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        merges.extend(sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]])))
    merges.sort(key=lambda m: m[2])
    return vocab, [(text(a), text(b)) for a, b, _ in merges]


@functools.cache
def _whisper_vocab(multilingual: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    name = "multilingual.tiktoken" if multilingual else "gpt2.tiktoken"
    return tiktoken_vocab_merges(whisper_assets_dir() / name)


def whisper_tokenizer(multilingual: bool) -> WhisperTokenizer:
    """Whisper's tokenizer: 51,866 tokens (multilingual, 100 languages as large-v3) or 51,864
    (English-only, 99 language tokens as the `.en` checkpoints keep)."""
    vocab, merges = _whisper_vocab(multilingual)
    tokenizer = WhisperTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="<|endoftext|>")
    languages = list(WHISPER_LANGUAGES)[: 100 if multilingual else 99]
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in languages),
        *WHISPER_CONTROL,
    ]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    return tokenizer


def whisper_non_speech_tokens(tokenizer: WhisperTokenizer) -> list[int]:
    """OpenAI's `Tokenizer.non_speech_tokens`: symbols Whisper never writes for speech."""
    symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
    symbols += [
        "<<",
        ">>",
        "<<<",
        ">>>",
        "--",
        "---",
        "-(",
        "-[",
        "('",
        '("',
        "((",
        "))",
        "(((",
        ")))",
        "[[",
        "]]",
        "{{",
        "}}",
        "♪♪",
        "♪♪♪",
    ]
    miscellaneous = set("♩♪♫♬♭♮♯")
    result = {tokenizer.encode(" -", add_special_tokens=False)[0]}
    result.add(tokenizer.encode(" '", add_special_tokens=False)[0])
    for symbol in symbols + list(miscellaneous):
        for tokens in (
            tokenizer.encode(symbol, add_special_tokens=False),
            tokenizer.encode(" " + symbol, add_special_tokens=False),
        ):
            if len(tokens) == 1 or symbol in miscellaneous:
                result.add(tokens[0])
    return sorted(result)


def whisper_generation_config(tokenizer: WhisperTokenizer, multilingual: bool) -> GenerationConfig:
    """The generation config the openai/whisper-* checkpoints ship (transformers' current
    format: `lang_to_id`, `task_to_id`, `no_timestamps_token_id`, no `forced_decoder_ids`)."""
    vocab = tokenizer.get_vocab()
    eot = vocab["<|endoftext|>"]
    languages = list(WHISPER_LANGUAGES)[: 100 if multilingual else 99]
    options: dict[str, object] = {}
    if multilingual:
        options["lang_to_id"] = {f"<|{c}|>": vocab[f"<|{c}|>"] for c in languages}
        options["task_to_id"] = {t: vocab[f"<|{t}|>"] for t in ("transcribe", "translate")}
    return GenerationConfig(
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=[vocab["Ġ"], eot],
        suppress_tokens=whisper_non_speech_tokens(tokenizer),
        is_multilingual=multilingual,
        no_timestamps_token_id=vocab["<|notimestamps|>"],
        prev_sot_token_id=vocab["<|startofprev|>"],
        max_initial_timestamp_index=50,
        max_length=448,
        max_new_tokens=WHISPER_MAX_NEW_TOKENS,
        **options,
    )


def whisper_model(tokenizer: WhisperTokenizer) -> WhisperForConditionalGeneration:
    """Two layers a side, width 32, Whisper's real input (80 mel bins, 30 s = 3000 frames)."""
    vocab = tokenizer.get_vocab()
    eot = vocab["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=HIDDEN,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * HIDDEN,
        decoder_ffn_dim=2 * HIDDEN,
        max_source_positions=1500,
        max_target_positions=448,
        init_std=INIT_STD,
        tie_word_embeddings=False,
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    return WhisperForConditionalGeneration(config)


def whisper_quiet_ids(tokenizer: WhisperTokenizer) -> list[int]:
    """EOS and the prompt's control tokens: the random decoder should not write them (the
    language and timestamp tokens stay: detection and timestamps need them)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in ("<|endoftext|>", "<|startoftranscript|>", *WHISPER_CONTROL))


def build_whisper(kind: str, out_dir: Path, seed: int) -> Path:
    multilingual = kind == "whisper"
    tokenizer = whisper_tokenizer(multilingual)
    torch.manual_seed(seed)
    model = whisper_model(tokenizer)
    model.generation_config = whisper_generation_config(tokenizer, multilingual)
    discourage(model, whisper_quiet_ids(tokenizer))
    with torch.no_grad():  # louder encoder states: the random decoder's text follows the audio
        model.model.encoder.layer_norm.weight.mul_(30.0)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out_dir)
    return out_dir
