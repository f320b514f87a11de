"""Compose a `SpeechEncoderDecoderModel` checkpoint that the service can serve without edits.

An encoder and a decoder come either as pretrained folders or hub ids
(`from_encoder_decoder_pretrained`: the decoder's cross-attention is new and reported as such) or
as configs (random initialisation, `from_encoder_decoder_configs`). The feature extractor and
tokenizer are written beside the weights and the generation ids are set from the tokenizer.
"""

import logging
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    SpeechEncoderDecoderConfig,
    SpeechEncoderDecoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
)

from model_store.domain import VOCABULARY

log = logging.getLogger(__name__)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def generation_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """`decoder_start_token_id`, `pad_token_id` and `eos_token_id` for a decoder's tokenizer.

    BERT-style tokenizers start with [CLS] and end with [SEP]; GPT-2 and BART style ones with
    their BOS and EOS. A tokenizer without a pad token pads with EOS (labels mask padding anyway).
    """
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.cls_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    missing = [name for name, value in (("start", start), ("eos", eos)) if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {' or '.join(missing)} token; add one before composing")
    return {
        "decoder_start_token_id": int(start),
        "pad_token_id": int(pad),
        "eos_token_id": int(eos),
    }


def finalize(
    model: SpeechEncoderDecoderModel,
    tokenizer: PreTrainedTokenizerBase,
    feature_extractor: Any,
    out_dir: Path,
    max_new_tokens: int = 32,
) -> None:
    """Set the generation ids from the tokenizer and save everything the service needs."""
    ids = generation_ids(tokenizer)
    for name, value in ids.items():
        setattr(model.config, name, value)
    model.config.decoder.pad_token_id = ids["pad_token_id"]  # type: ignore[union-attr]
    model.generation_config = GenerationConfig(
        **ids, bos_token_id=ids["decoder_start_token_id"], max_new_tokens=max_new_tokens
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`encoder_x=...` / `decoder_y=...` keyword overrides as in the seed's API."""
    enc = {k.removeprefix("encoder_"): v for k, v in overrides.items() if k.startswith("encoder_")}
    dec = {k.removeprefix("decoder_"): v for k, v in overrides.items() if k.startswith("decoder_")}
    unknown = set(overrides) - {f"encoder_{k}" for k in enc} - {f"decoder_{k}" for k in dec}
    if unknown:
        raise ValueError(f"overrides must start with encoder_ or decoder_: {sorted(unknown)}")
    return enc, dec


def compose_pretrained(
    encoder: str, decoder: str, out_dir: Path, **overrides: Any
) -> SpeechEncoderDecoderModel:
    """Join a pretrained encoder and decoder (folders or hub ids) and save a servable checkpoint."""
    enc, dec = split_overrides(overrides)
    model: SpeechEncoderDecoderModel = SpeechEncoderDecoderModel.from_encoder_decoder_pretrained(  # type: ignore[assignment]
        encoder,
        decoder,
        **{f"encoder_{k}": v for k, v in enc.items()},
        **{f"decoder_{k}": v for k, v in dec.items()},
    )
    new = newly_initialised(model)
    log.info(
        "newly initialised decoder weights (train them): %d tensors, e.g. %s",
        len(new),
        ", ".join(new[:3]),
    )
    finalize(
        model,
        AutoTokenizer.from_pretrained(decoder),
        AutoFeatureExtractor.from_pretrained(encoder),
        out_dir,
    )
    return model


def newly_initialised(model: SpeechEncoderDecoderModel) -> list[str]:
    """Names of the cross-attention parameters, which a decoder-only checkpoint never had."""
    return [
        name
        for name, _ in model.decoder.named_parameters()
        if "crossattention" in name or "encoder_attn" in name or "cross_attn" in name
    ]


def compose_configs(
    encoder_config: PretrainedConfig,
    decoder_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    feature_extractor: Any,
    out_dir: Path,
    seed: int = 0,
) -> SpeechEncoderDecoderModel:
    """Randomly initialise a model from two configs and save a servable checkpoint."""
    import torch

    torch.manual_seed(seed)
    config = SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, decoder_config)
    model = SpeechEncoderDecoderModel(config=config)
    finalize(model, tokenizer, feature_extractor, out_dir)
    return model


def load_config(name_or_path: str, **overrides: Any) -> PretrainedConfig:
    """A config from a folder or hub id, with overrides applied."""
    config = AutoConfig.from_pretrained(name_or_path)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def word_tokenizer(out_dir: Path, words: tuple[str, ...] = VOCABULARY) -> BertTokenizer:
    """A BERT tokenizer whose vocabulary is exactly the domain's words (one token per word)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = out_dir / "vocab.txt"
    vocab.write_text("\n".join((*BERT_SPECIALS, *words)) + "\n")
    return BertTokenizer(str(vocab), do_lower_case=True)


def default_configs(vocab_size: int) -> tuple[Wav2Vec2Config, BertConfig]:
    """The bundled model's shape: a 4-layer wav2vec2 (width 256) and a 2-layer BERT decoder.

    The convolutional front end has four layers instead of seven and a 640-sample hop (25 frames
    a second, enough for word-level output), which trains about three times faster on a CPU.
    The feature encoder uses layer norm (not group norm) so that the model takes an attention
    mask: padded batches give the same output as single requests.
    """
    encoder = Wav2Vec2Config(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        conv_dim=(64, 128, 256, 256),
        conv_kernel=(10, 8, 4, 8),
        conv_stride=(5, 4, 4, 8),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        num_conv_pos_embeddings=64,
        num_conv_pos_embedding_groups=16,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.05,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.05,
        mask_time_length=5,
        mask_feature_prob=0.0,
        vocab_size=32,
    )
    decoder = BertConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        is_decoder=True,
        add_cross_attention=True,
    )
    return encoder, decoder


def default_feature_extractor() -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def compose_default(out_dir: Path, seed: int = 0) -> SpeechEncoderDecoderModel:
    """The untrained starting point of the bundled model."""
    tokenizer = word_tokenizer(out_dir)
    encoder, decoder = default_configs(len(tokenizer))
    return compose_configs(encoder, decoder, tokenizer, default_feature_extractor(), out_dir, seed)
