"""The command line as a user runs it (a subprocess: the CLI sets up its own environment)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ASSETS

TUNELOOP = str(Path(sys.executable).parent / "tuneloop")


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNELOOP_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([TUNELOOP, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_every_command(tmp_path: Path) -> None:
    out = run("--help", home=tmp_path).stdout
    for command in ("demo", "up", "down", "train", "promote", "monitor", "validate"):
        assert command in out


def test_validate_passes_and_fails_with_exit_codes(tmp_path: Path) -> None:
    ok = run("validate", str(ASSETS / "tiny_qa.jsonl"), home=tmp_path)
    assert ok.returncode == 0 and "validation passed" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(12)))
    failed = run("validate", str(bad), home=tmp_path)
    assert failed.returncode == 1
    assert 'field "response": missing from every row' in failed.stdout


def test_bad_override_is_a_usage_error(tmp_path: Path) -> None:
    result = run("validate", str(ASSETS / "tiny_qa.jsonl"), "--set", "train.max_steps=-1", home=tmp_path)
    assert result.returncode == 2 and "train.max_steps" in result.stdout
