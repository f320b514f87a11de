"""The checkpoint recipe: compose (configs and pretrained folders), corpus, train, resume."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertLMHeadModel,
    SpeechEncoderDecoderModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from model_store import compose
from model_store.__main__ import main as model_store_main
from model_store.corpus import CorpusSplit, SplitSpec, synthesize_split, variant_groups
from model_store.domain import VOCABULARY, sentence
from model_store.evaluate import score, word_error_rate
from model_store.train import TrainConfig, Trainer
from service.engine.adapter import ModelAdapter
from service.engine.types import GenerationParams


def tiny_configs(vocab_size: int) -> tuple[Wav2Vec2Config, BertConfig]:
    encoder = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 32),
        conv_kernel=(10, 8),
        conv_stride=(5, 64),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
    )
    decoder = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        is_decoder=True,
        add_cross_attention=True,
    )
    return encoder, decoder


def test_domain_sentences_use_only_the_vocabulary() -> None:
    rng = random.Random(0)
    words = {w for _ in range(2000) for w in sentence(rng).split()}
    assert words == set(VOCABULARY)  # every word is reachable, none is outside


def test_voice_split_keeps_test_voices_out_of_training() -> None:
    variants = [f"v{i}" for i in range(40)]
    groups = variant_groups(variants)
    assert set(groups["train"]).isdisjoint(groups["test"])
    assert set(groups["train"]).isdisjoint(groups["dev"])
    assert sorted(groups["train"] + groups["dev"] + groups["test"]) == sorted(variants)
    assert len(groups["test"]) == 5


def test_compose_from_configs_serves_through_the_adapter(tiny_init: Path) -> None:
    adapter = ModelAdapter(tiny_init, "composed")
    tokenizer = adapter.tokenizer
    gen = adapter.model.generation_config
    assert gen.decoder_start_token_id == tokenizer.cls_token_id
    assert gen.eos_token_id == tokenizer.sep_token_id
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert adapter.info.padding_invariant
    (row,) = adapter.transcribe([np.zeros(16_000, np.float32)], GenerationParams(max_new_tokens=4))
    assert len(row.tokens) <= 4


def test_compose_from_pretrained_folders_keeps_weights_and_reports_new_ones(
    tmp_path: Path,
) -> None:
    tokenizer = compose.word_tokenizer(tmp_path / "dec")
    enc_cfg, dec_cfg = tiny_configs(len(tokenizer))
    torch.manual_seed(0)
    encoder = Wav2Vec2Model(enc_cfg)
    encoder.save_pretrained(tmp_path / "enc")
    compose.default_feature_extractor().save_pretrained(tmp_path / "enc")
    plain_decoder = BertConfig(
        **{**dec_cfg.to_dict(), "is_decoder": False, "add_cross_attention": False}
    )
    BertLMHeadModel(plain_decoder).save_pretrained(tmp_path / "dec")
    tokenizer.save_pretrained(tmp_path / "dec")

    model_store_main(
        [
            "compose",
            "--encoder",
            str(tmp_path / "enc"),
            "--decoder",
            str(tmp_path / "dec"),
            "--out",
            str(tmp_path / "joined"),
        ]
    )
    adapter = ModelAdapter(tmp_path / "joined", "joined")
    joined = adapter.model
    assert joined.config.decoder.add_cross_attention
    assert compose.newly_initialised(joined)  # cross-attention did not exist before
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(joined.encoder.state_dict()[name], tensor), name
    assert adapter.transcribe([np.zeros(8000, np.float32)], GenerationParams(max_new_tokens=3))


def test_compose_from_configs_cli_with_overrides(tmp_path: Path) -> None:
    tokenizer = compose.word_tokenizer(tmp_path / "dec")
    enc_cfg, dec_cfg = tiny_configs(len(tokenizer))
    enc_cfg.save_pretrained(tmp_path / "enc")
    compose.default_feature_extractor().save_pretrained(tmp_path / "enc")
    dec_cfg.save_pretrained(tmp_path / "dec")
    model_store_main(
        [
            "compose",
            "--from-configs",
            "--encoder",
            str(tmp_path / "enc"),
            "--decoder",
            str(tmp_path / "dec"),
            "--out",
            str(tmp_path / "m"),
            "--set",
            "decoder_num_hidden_layers=2",
            "--set",
            "encoder_hidden_dropout=0.2",
        ]
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["decoder"]["num_hidden_layers"] == 2
    assert config["encoder"]["hidden_dropout"] == 0.2
    assert ModelAdapter(tmp_path / "m", "m").info.architecture == "wav2vec2+bert"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synthesize_split(SplitSpec("train", 48, "train", held_out_rates=False, seed=5), root, 2)
    synthesize_split(SplitSpec("dev", 8, "dev", held_out_rates=False, seed=6), root, 2)
    return root


def test_corpus_is_cached_and_well_formed(tiny_corpus: Path) -> None:
    split = CorpusSplit(tiny_corpus, "train")
    assert len(split) == 48
    example = split[0]
    assert example.audio.dtype == np.float32
    assert 0.3 < len(example.audio) / 16_000 < 10
    assert 0.01 < float(np.abs(example.audio).max()) <= 1.0
    before = (tiny_corpus / "train.npy").stat().st_mtime_ns
    synthesize_split(SplitSpec("train", 48, "train", held_out_rates=False, seed=5), tiny_corpus)
    assert (tiny_corpus / "train.npy").stat().st_mtime_ns == before  # reused, not redone


def _train_config(init: Path, corpus: Path, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        init=str(init),
        corpus=str(corpus),
        out=str(out),
        max_steps=steps,
        batch_seconds=16,
        lr=3e-3,
        warmup_steps=1,
        eval_every=1000,
        eval_size=4,
        save_every=2,
        threads=1,
        save_fp16=False,
    )


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("init")
    tokenizer = compose.word_tokenizer(root)
    encoder, decoder = tiny_configs(len(tokenizer))
    compose.compose_configs(encoder, decoder, tokenizer, compose.default_feature_extractor(), root)
    return root


def test_training_lowers_the_loss_on_a_fixed_batch(
    tiny_init: Path, tiny_corpus: Path, tmp_path: Path
) -> None:
    trainer = Trainer(_train_config(tiny_init, tiny_corpus, tmp_path / "run", steps=12))
    batch = trainer.collate([trainer.train_split[i] for i in range(8)])
    trainer.model.eval()
    with torch.no_grad():
        before = float(trainer.loss(batch)[0])
    for _ in range(12):
        trainer.train_step(list(range(8)))
    trainer.model.eval()
    with torch.no_grad():
        after = float(trainer.loss(batch)[0])
    assert after < 0.8 * before


def test_resume_after_interruption_gives_the_same_next_loss(
    tiny_init: Path, tiny_corpus: Path, tmp_path: Path
) -> None:
    straight = Trainer(_train_config(tiny_init, tiny_corpus, tmp_path / "a", steps=4))
    assert straight.run() == tmp_path / "a" / "final"
    interrupted = Trainer(_train_config(tiny_init, tiny_corpus, tmp_path / "b", steps=4))
    assert interrupted.run(stop_after=2) is None
    assert json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())["step"] == 2
    resumed = Trainer(_train_config(tiny_init, tiny_corpus, tmp_path / "b", steps=4))
    assert resumed.step == 2
    resumed.run()
    losses_a = [r["loss"] for r in straight.history]
    losses_b = [r["loss"] for r in resumed.history]
    assert losses_b[2] == pytest.approx(losses_a[2], rel=1e-5)
    assert losses_b[3] == pytest.approx(losses_a[3], rel=1e-5)
    adapter = ModelAdapter(tmp_path / "b" / "final", "trained")
    assert adapter.info.architecture == "wav2vec2+bert"


def test_time_budget_stops_with_a_checkpoint_that_resumes(
    tiny_init: Path, tiny_corpus: Path, tmp_path: Path
) -> None:
    """`max_minutes` spent: the run evaluates, saves `last`, exports `final`; a later run with a
    budget left goes on from that step to `max_steps`."""
    cfg = _train_config(tiny_init, tiny_corpus, tmp_path / "run", steps=5)
    cfg.max_minutes = 1e-9  # spent after the first step
    cfg.save_every = 1000
    first = Trainer(cfg)
    assert first.run() == tmp_path / "run" / "final"
    assert first.step == 1
    assert "dev_wer" in first.history[-1]  # evaluated before stopping
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    cfg.max_minutes = 0.0
    again = Trainer(cfg)
    assert again.step == 1
    again.run()
    assert again.step == 5
    assert [r["step"] for r in again.history] == [1, 2, 3, 4, 5]


def test_export_best_takes_the_lowest_dev_wer_checkpoint(
    tiny_init: Path, tiny_corpus: Path, tmp_path: Path
) -> None:
    cfg = _train_config(tiny_init, tiny_corpus, tmp_path / "run", steps=4)
    cfg.eval_every = 1
    cfg.export_best = True
    trainer = Trainer(cfg)
    final = trainer.run()
    assert final is not None
    wers = [r["dev_wer"] for r in trainer.history]
    best_step = wers.index(min(wers)) + 1  # the first step with the lowest WER
    best = json.loads((tmp_path / "run" / "best" / "trainer_state.json").read_text())
    assert best["step"] == best_step
    exported = SpeechEncoderDecoderModel.from_pretrained(final).state_dict()
    kept = SpeechEncoderDecoderModel.from_pretrained(tmp_path / "run" / "best").state_dict()
    assert all(torch.equal(exported[k], kept[k]) for k in kept)


def test_frozen_convolutions_do_not_change(
    tiny_init: Path, tiny_corpus: Path, tmp_path: Path
) -> None:
    cfg = _train_config(tiny_init, tiny_corpus, tmp_path / "run", steps=3)
    cfg.freeze_conv_layers = 1
    trainer = Trainer(cfg)
    convs = trainer.model.encoder.feature_extractor.conv_layers  # type: ignore[union-attr]
    before = [layer.conv.weight.detach().clone() for layer in convs]
    for _ in range(3):
        trainer.train_step(list(range(8)))
    assert torch.equal(convs[0].conv.weight, before[0])
    assert not torch.equal(convs[1].conv.weight, before[1])


def test_error_rates_count_words_said_to_silence() -> None:
    """A clip without speech has an empty reference: each word said to it is an insertion."""
    assert word_error_rate(["", "one two"], ["three", "one two"]) == 0.5
    assert word_error_rate(["", "one two"], ["", "one"]) == 0.5
    assert word_error_rate(["one two"], [""]) == 1.0
    nonspeech = score("nonspeech", ["", ""], ["go left", ""], 2.0)
    assert nonspeech.wer == 2.0  # no reference words: the count of words output
    assert nonspeech.exact_match == 0.5
