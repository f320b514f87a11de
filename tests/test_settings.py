"""Settings: bounds, device expansion, worker and thread counts."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def make(tmp_path: Path, **kw: object) -> Settings:
    return Settings(model_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_devices(tmp_path: Path) -> None:
    assert make(tmp_path).devices(cuda_count=2, cores=16) == ["cuda:0", "cuda:1"]
    assert make(tmp_path).devices(cuda_count=0, cores=2) == ["cpu", "cpu"]
    assert make(tmp_path).devices(cuda_count=0, cores=16) == ["cpu"] * 4
    assert make(tmp_path, cpu_workers=1).devices(cuda_count=0, cores=2) == ["cpu"]
    big = 232_000_000  # a large model is served best by one worker with every core
    assert make(tmp_path).devices(cuda_count=0, cores=16, parameters=big) == ["cpu"]
    assert make(tmp_path).devices(cuda_count=0, cores=16, parameters=6_000_000) == ["cpu"] * 4
    assert (
        make(tmp_path, cpu_workers=3).devices(cuda_count=0, cores=16, parameters=big) == ["cpu"] * 3
    )
    assert make(tmp_path, device="cuda:1").devices(cuda_count=2, cores=2) == ["cuda:1"]
    with pytest.raises(ValueError, match="unknown device"):
        make(tmp_path, device="tpu").devices(cuda_count=0, cores=2)


def test_threads_split_the_cores(tmp_path: Path) -> None:
    assert make(tmp_path).threads_per_cpu_worker(cores=2, workers=2) == 1
    assert make(tmp_path).threads_per_cpu_worker(cores=16, workers=4) == 4
    assert make(tmp_path, cpu_threads=3).threads_per_cpu_worker(cores=16, workers=4) == 3


def test_bounds_and_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        make(tmp_path, max_batch_size=0)
    with pytest.raises(ValidationError):
        make(tmp_path, max_wait_ms=-1)
    with pytest.raises(ValidationError, match="not a folder"):
        Settings(model_dir=tmp_path / "missing")
    env_style = Settings.model_validate({"model_dir": str(tmp_path), "port": "9000"})
    assert env_style.port == 9000
