"""The README's examples run verbatim against a live server: every code block marked
`<!-- runnable -->` is run (bash with `bash -e`, Python with this interpreter) from the
repository root against `python -m service` on the bundled model, with only the port changed.
Each must exit 0 and print the known transcript of every bundled sample it sends."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLEAN_EXIT, ServiceProcess

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SAMPLES = REPO / "model_store" / "w2v2-bert-commands-en" / "samples"
TEXTS: dict[str, str] = json.loads((SAMPLES / "texts.json").read_text())
BLOCKS = re.findall(r"<!-- runnable -->\n```(bash|python)\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    served = ServiceProcess("--cpu-workers", "1")
    yield served
    assert served.stop() in CLEAN_EXIT


def test_the_readme_marks_its_examples() -> None:
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("bash") >= 1
    assert kinds.count("python") >= 2  # the OpenAI client and the websocket client


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "code"), BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(kind: str, code: str, service: ServiceProcess) -> None:
    code = re.sub(r"(localhost|127\.0\.0\.1):8000", rf"\g<1>:{service.port}", code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", "-e", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = sorted(set(re.findall(r"samples/([\w-]+\.wav)", code)))
    assert sent, "an example that sends no bundled sample proves nothing here"
    for name in sent:
        assert TEXTS[name] in done.stdout, (name, done.stdout)
    if "response_format=srt" in code:
        assert re.search(r"00:00:00,000 --> 00:00:\d\d,\d{3}\ncall home", done.stdout)
