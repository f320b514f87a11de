"""The README stays true: its test command is what CI runs, and it documents every setting."""

import re
from pathlib import Path

from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    setup = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(commands) == 2  # one to serve, one to test
    serve, test = commands
    assert serve.endswith("python -m service")
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`STT_{name.upper()}`" in README, name


def test_every_path_in_the_readme_exists() -> None:
    for path in re.findall(r"\]\(((?:model_store|service|tests)/[^)#]+)\)", README):
        assert (REPO / path).exists(), path
    for path in re.findall(r"@(model_store/\S+\.wav)", README):
        assert (REPO / path).exists(), path
