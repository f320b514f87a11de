"""`STT_MODELS`: its two syntaxes, the names it refuses, and the split of devices and cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import settings_from
from service.metrics import Metrics
from service.scale.deployment import ScaleOptions
from service.settings import Settings, parse_models


def split(settings: Settings, cuda: int, cores: int) -> list[tuple[str, str, int, int, int]]:
    """(name, device, cpu_workers, cpu_threads, cores) of each model."""
    return [
        (s.served_name, s.device, s.cpu_workers, s.cpu_threads, share)
        for s, share in settings.split_for(cuda, cores)
    ]


def test_short_form_names_and_bare_sources(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    settings = Settings(models=f"a={folder}, {folder} ,org/name")  # type: ignore[arg-type]
    assert [m.served_name for m in settings.models] == ["a", "my-model", "org/name"]
    assert [m.model for m in settings.models] == [str(folder), str(folder), "org/name"]
    assert settings.served_name == "a"  # the first is the default
    assert parse_models("x=y") == [{"name": "x", "model": "y"}]
    for bad in ("=y", "x=", "x= "):
        with pytest.raises(ValueError, match="empty"):
            parse_models(bad)


def test_json_form_takes_the_overrides() -> None:
    text = json.dumps(
        [
            {"model": "org/a", "name": "a", "aliases": ["whisper-1"], "cpu_threads": 3},
            {"model": "org/b", "device": "cuda:1", "cpu_workers": 2, "language": "de"},
        ]
    )
    settings = Settings(models=text)  # type: ignore[arg-type]
    (a, _), (b, _) = settings.split_for(cuda_count=2, cores=8)
    assert (a.model, a.served_name, a.model_aliases, a.cpu_threads) == (
        "org/a",
        "a",
        ["whisper-1"],
        3,
    )
    assert (b.served_name, b.device, b.cpu_workers, b.language) == ("org/b", "cuda:1", 2, "de")
    assert a.device == "cuda:0"  # its share of the two GPUs; b chose cuda:1 itself
    assert not a.models
    assert not b.models
    with pytest.raises(ValidationError, match="extra"):
        Settings(models='[{"model": "x", "threads": 2}]')  # type: ignore[arg-type]


def test_names_must_be_unique_and_models_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="used twice"):
        Settings(models="a=x,a=y")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="used twice"):
        Settings(models="a=x,b=y", model_aliases=["b"])
    for clash in ({"model": "org/x"}, {"model_dir": tmp_path}, {"model_name": "n"}):
        with pytest.raises(ValidationError, match="cannot be set with it"):
            Settings(models="a=x", **clash)  # type: ignore[arg-type]


def test_the_split_rule() -> None:
    three = Settings(models="a=x,b=y,c=z")  # type: ignore[arg-type]
    # CPU only: cores divided evenly, the remainder to the first; workers and threads 0 here
    # mean "by the model's size within its share" (Engine.load), as for one model
    assert split(three, cuda=0, cores=8) == [
        ("a", "cpu", 0, 0, 3),
        ("b", "cpu", 0, 0, 3),
        ("c", "cpu", 0, 0, 2),
    ]
    assert [share for *_, share in split(three, cuda=0, cores=2)] == [1, 1, 1]  # at least one
    # GPUs: disjoint groups while there are enough, else shared round robin
    assert [d for _, d, *_ in split(three, cuda=4, cores=8)] == [
        "cuda:0,cuda:1",
        "cuda:2",
        "cuda:3",
    ]
    assert [d for _, d, *_ in split(three, cuda=2, cores=8)] == ["cuda:0", "cuda:1", "cuda:0"]
    listed = Settings(models="a=x,b=y", device="cuda:2,cuda:3")  # type: ignore[arg-type]
    assert [d for _, d, *_ in split(listed, cuda=4, cores=8)] == ["cuda:2", "cuda:3"]
    on_cpu = Settings(models="a=x,b=y", device="cpu", cpu_workers=1)  # type: ignore[arg-type]
    assert split(on_cpu, cuda=2, cores=4) == [("a", "cpu", 1, 0, 2), ("b", "cpu", 1, 0, 2)]


def test_the_flag_is_generated_and_a_clash_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_from(["--models", "a=org/x,b=org/y"])
    assert [m.served_name for m in settings.models] == ["a", "b"]
    with pytest.raises(SystemExit) as exited:
        settings_from(["--models", "a=org/x", "--model", "org/z"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "python -m service: invalid settings: Value error, models lists every served model; "
        "model cannot be set with it (put that model first in models to make it the default)"
    ]


def test_ray_serve_refuses_several_models() -> None:
    with pytest.raises(ValueError, match=r"STT_MODELS .* is not supported on Ray Serve"):
        ScaleOptions(stt={"models": "a=org/x,b=org/y"}).settings()


def test_metrics_views_label_by_model_only_with_several_models() -> None:
    one = Metrics()
    assert one.for_model("x") is one  # one model: the families as they always were
    one.audio_seconds.inc(2)
    assert b"stt_audio_seconds_total 2.0" in one.render()
    several = Metrics(by_model=True)
    several.for_model("a").audio_seconds.inc(1)
    several.for_model("b").stage_duration.labels(stage="encoder").observe(0.5)
    several.for_model("a").model.info({"model": "a", "architecture": "whisper"})
    text = several.render().decode()
    assert 'stt_audio_seconds_total{model="a"} 1.0' in text
    assert 'stt_stage_duration_seconds_count{model="b",stage="encoder"} 1.0' in text
    assert 'stt_model_info{architecture="whisper",model="a"} 1.0' in text
    assert several.for_model("a") is several.for_model("b").for_model("a")


@pytest.mark.slow
def test_the_ray_command_refuses_several_models_in_one_line() -> None:
    env = {**os.environ, "STT_MODELS": "a=org/x,b=org/y"}
    done = subprocess.run(
        [sys.executable, "-m", "service.scale", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "python -m service.scale: STT_MODELS (several models in one server) is not supported "
        "on Ray Serve: deploy one application per model (each with its own STT_MODEL and route "
        "prefix), or serve several models with python -m service"
    ]
