"""The second-edition corpus's pieces: augmentation transforms measured on tones and noise, and
the multi-synthesizer plan (flite never in training; held-out espeak-ng variants stay out)."""

from pathlib import Path

import numpy as np
import pytest

from model_store import augment, multisynth
from model_store.corpus import espeak_variants, variant_groups

SR = augment.SAMPLE_RATE


def tone(freq: float, seconds: float = 1.0, amp: float = 0.5) -> augment.Audio:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_freq(audio: augment.Audio) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / SR)[int(np.argmax(spectrum))])


def band_power(audio: augment.Audio, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / SR)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_resampling_perturbation_scales_pitch_and_duration_together() -> None:
    out = augment.resample_perturb(tone(400.0), 1.1)
    assert len(out) == pytest.approx(SR / 1.1, abs=2)
    assert peak_freq(out) == pytest.approx(440.0, abs=3)
    with pytest.raises(ValueError, match="positive"):
        augment.resample_perturb(tone(400.0), 0)


def test_room_impulse_response_decays_by_its_rt60() -> None:
    rng = np.random.default_rng(0)
    ir = augment.room_impulse_response(rng, 0.5)
    assert len(ir) == int(0.5 * SR)
    assert int(np.argmax(np.abs(ir))) < int(0.003 * SR)  # the direct sound is the loudest
    early = float(np.sum(ir[int(0.01 * SR) : int(0.06 * SR)] ** 2))
    late = float(np.sum(ir[int(0.40 * SR) : int(0.45 * SR)] ** 2))
    assert 10 * np.log10(early / late) > 30  # about 60 dB per rt60: ~48 dB over 0.39 s


def test_reverberation_keeps_the_peak_and_fills_the_pause() -> None:
    rng = np.random.default_rng(1)
    burst = np.concatenate([tone(300.0, 0.2), np.zeros(SR // 2, np.float32)])
    wet = augment.reverberate(burst, augment.room_impulse_response(rng, 0.8))
    assert np.abs(wet).max() == pytest.approx(np.abs(burst).max(), rel=1e-4)
    pause = slice(int(0.25 * SR), int(0.35 * SR))
    assert augment.rms(wet[pause]) > 1e-3 > augment.rms(burst[pause])


@pytest.mark.parametrize("colour", ["white", "pink", "brown", "hum"])
def test_noise_has_unit_rms(colour: str) -> None:
    noise = augment.coloured_noise(np.random.default_rng(2), SR, colour)
    assert len(noise) == SR
    assert augment.rms(noise) == pytest.approx(1.0, rel=1e-3)


def test_pink_and_brown_noise_tilt_towards_low_frequencies() -> None:
    rng = np.random.default_rng(3)
    tilt = {
        c: band_power(n, 50, 500) / band_power(n, 4000, 4450)
        for c in ("white", "pink", "brown")
        for n in [augment.coloured_noise(rng, 4 * SR, c)]
    }
    assert tilt["white"] < 2 * 450 / 450 * 1.5  # white: equal power per Hz
    assert tilt["pink"] > 5 * tilt["white"]
    assert tilt["brown"] > 5 * tilt["pink"]


def test_noise_is_mixed_at_the_requested_snr() -> None:
    rng = np.random.default_rng(4)
    speech = tone(500.0)
    noise = augment.coloured_noise(rng, len(speech), "white")
    mixed = augment.add_noise(speech, noise, 10.0)
    snr = 20 * np.log10(augment.rms(speech) / augment.rms(mixed - speech))
    assert snr == pytest.approx(10.0, abs=0.05)


def test_babble_is_made_of_the_other_utterances() -> None:
    rng = np.random.default_rng(5)
    others = [tone(700.0, 0.7), tone(1300.0, 0.4)]
    out = augment.babble(rng, 2 * SR, others, talkers=3)
    assert augment.rms(out) == pytest.approx(1.0, rel=1e-3)
    assert band_power(out, 650, 750) + band_power(out, 1250, 1350) > 0.95 * band_power(out, 0, 8000)


def test_telephone_keeps_the_voice_band_and_drops_the_rest() -> None:
    rng = np.random.default_rng(6)
    voice, hiss = tone(1000.0), tone(6000.0)
    assert augment.rms(augment.telephone(voice, rng)) > 0.5 * augment.rms(voice)
    assert augment.rms(augment.telephone(hiss, rng)) < 0.01 * augment.rms(hiss)


def test_low_pass_band_limits() -> None:
    out = augment.band_limit(tone(1000.0) + tone(6000.0), 3000.0)
    assert band_power(out, 5900, 6100) < 1e-4 * band_power(out, 900, 1100)


@pytest.mark.parametrize(("codec", "bit_rate"), [("mp3", 32_000), ("opus", 12_000)])
def test_codec_round_trip_is_lossy_but_keeps_the_signal(codec: str, bit_rate: int) -> None:
    source = tone(440.0) + tone(1200.0, amp=0.2)
    out = augment.codec_round_trip(source, codec, bit_rate)
    assert len(out) == len(source)
    assert not np.allclose(out, source, atol=1e-3)  # lossy: not the same samples
    middle = slice(SR // 4, 3 * SR // 4)
    assert augment.rms(out[middle]) == pytest.approx(augment.rms(source[middle]), rel=0.2)
    assert peak_freq(out) == pytest.approx(440.0, abs=3)


def test_clipping_and_level() -> None:
    loud = augment.clip(tone(300.0, amp=0.8), 0.5)
    assert np.abs(loud).max() == pytest.approx(0.4, abs=1e-6)
    assert np.abs(augment.level(tone(300.0), 0.1)).max() == pytest.approx(0.1, rel=1e-5)


def test_surrounding_silence_stays_within_two_seconds_and_keeps_the_speech() -> None:
    rng = np.random.default_rng(7)
    speech = tone(300.0, 0.5)
    lengths = []
    for _ in range(200):
        out = augment.surround(speech, rng)
        extra = len(out) - len(speech)
        assert 0.1 * SR <= extra <= 4 * SR
        lengths.append(extra / SR)
        start = int(np.flatnonzero(np.abs(out) > 0.01)[0]) - 1  # the tone starts at 0: sin(0)
        assert np.allclose(out[start : start + len(speech)], speech, atol=1e-3)
    assert max(lengths) > 2.5
    assert min(lengths) < 0.3


def test_augment_is_deterministic_and_varied() -> None:
    speech = tone(300.0, 0.8)
    first = augment.augment(speech, np.random.default_rng(8), [tone(900.0)])
    again = augment.augment(speech, np.random.default_rng(8), [tone(900.0)])
    assert first[1] == again[1]
    assert np.array_equal(first[0], again[0])
    chains = {
        tuple(augment.augment(speech, np.random.default_rng(s), [tone(900.0)])[1])
        for s in range(60)
    }
    applied = [n for chain in chains for n in chain]
    for kind in ("speed", "reverb", "babble", "pink", "hum", "telephone", "lowpass", "mp3", "opus"):
        assert any(n.startswith(kind) for n in applied), kind
    for s in range(20):
        out, _ = augment.augment(speech, np.random.default_rng(s), [])
        assert out.dtype == np.float32
        assert 0 < np.abs(out).max() <= 1.0


def test_noise_only_clips_have_the_asked_length() -> None:
    rng = np.random.default_rng(9)
    for _ in range(12):
        clip = augment.noise_only(rng, 1.5, [tone(500.0)])
        assert len(clip) == int(1.5 * SR)
        assert np.abs(clip).max() <= 0.32


def test_flite_is_never_in_training_and_test_variants_stay_out() -> None:
    variants = [f"v{i}" for i in range(40)]
    mixes = {m.name: m for m in multisynth.stage2_mixes(2000)}
    train = multisynth.plan(mixes["train"], variants)
    dev = multisynth.plan(mixes["dev"], variants)
    assert {it.synth for it in train} == {"espeak", "festival", "none"}
    assert "flite" not in {it.synth for it in dev}
    held_out = set(variant_groups(variants)["test"])
    assert not {it.voice.split("+")[1] for it in train + dev if it.synth == "espeak"} & held_out
    test = multisynth.plan(mixes["test_espeak"], variants)
    assert {it.voice.split("+")[1] for it in test} <= held_out
    assert {it.rate for it in test} <= set(range(100, 241))
    assert sum(it.text == "" for it in train) == 100  # 5% without speech, labelled empty
    flite = multisynth.plan(mixes["test_flite"], variants)
    assert {it.voice for it in flite} == set(multisynth.FLITE_VOICES)


def test_festival_script_sets_each_voice_and_its_prosody(tmp_path: Path) -> None:
    items = [
        multisynth.Item(
            "festival",
            "kal",
            "go left",
            0,
            (("stretch", 1.2), ("f0_mean", 90.0), ("f0_std", 10.0)),
            "light",
            1,
        ),
        multisynth.Item(
            "festival",
            "slt",
            "call mom",
            0,
            (("speed", 1.1), ("semitones", -3.0), ("alpha", 0.45)),
            "light",
            2,
        ),
    ]
    paths = [tmp_path / f"{i}.wav" for i in range(len(items))]
    script = multisynth._festival_script(list(zip(items, paths, strict=True)))
    assert "(voice_kal_diphone)" in script
    assert "(voice_cmu_us_slt_arctic_hts)" in script
    assert "Duration_Stretch 1.2" in script
    assert "target_f0_mean 90.0" in script
    assert '"-fm" -3.0' in script
    assert '"-r" 1.1' in script


def test_every_synthesizer_speaks_and_conditions_apply() -> None:
    """Real espeak-ng, Festival (three voices) and flite: a clip each, all non-silent 16 kHz."""
    variants = espeak_variants()
    mix = multisynth.Mix("x", espeak=2, festival=6, flite=4, empty=1, condition="augment", seed=5)
    items = multisynth.plan(mix, variants)
    out = multisynth.render_chunk(items)
    for item, audio in zip(items, out, strict=True):
        assert audio.dtype == np.int16
        if item.synth != "none":
            assert len(audio) > 0.3 * SR, item
            assert np.abs(audio).max() > 300, item
    assert {it.voice for it in items if it.synth == "festival"} == set(multisynth.FESTIVAL_VOICES)
