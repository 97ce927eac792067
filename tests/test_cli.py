"""The command line as a user runs it (a subprocess: the CLI sets up its own environment)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ASSETS

TUNELOOP = str(Path(sys.executable).parent / "tuneloop")


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNELOOP_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([TUNELOOP, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_every_command(tmp_path: Path) -> None:
    out = run("--help", home=tmp_path).stdout
    for command in ("demo", "up", "down", "train", "promote", "monitor", "validate", "evaluate"):
        assert command in out


def tiny_home(tmp_path: Path, models_dir: Path) -> tuple[Path, list[str]]:
    """A state dir sharing the session's built models, and overrides for the tiny model."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    sets = ["model.base=builtin:tiny-llama", "train.max_seq_len=48", "validation.data_docs=false"]
    return home, [a for s in sets for a in ("--set", s)]


def test_validate_passes_and_fails_with_exit_codes(tmp_path: Path, models_dir: Path) -> None:
    home, sets = tiny_home(tmp_path, models_dir)
    ok = run("validate", str(ASSETS / "tiny_qa.jsonl"), *sets, home=home)
    assert ok.returncode == 0 and "Validation passed" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(12)))
    failed = run("validate", str(bad), *sets, home=home)
    assert failed.returncode == 1
    assert "expect_column_to_exist" in failed.stdout and "response: missing from every row" in failed.stdout


def test_validate_shows_contracts_and_the_masked_example(tmp_path: Path, models_dir: Path) -> None:
    home, sets = tiny_home(tmp_path, models_dir)
    rows = [{"prompt": f"What is {i} times 3?", "response": f"It is {3 * i}."} for i in range(12)]
    rows[4]["prompt"] = "Explain, in as many words as it takes, why three times four is twelve. " * 6
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("validate", str(data), *sets, home=home)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loss_mask" in result.stdout and "Validation FAILED" in result.stdout
    assert "Row 5 as the trainer sees it" in result.stdout and "Report:" in result.stdout


def test_bad_override_is_a_usage_error(tmp_path: Path) -> None:
    result = run("validate", str(ASSETS / "tiny_qa.jsonl"), "--set", "train.max_steps=-1", home=tmp_path)
    assert result.returncode == 2 and "train.max_steps" in result.stdout


@pytest.mark.slow
def test_evaluate_prints_a_leaderboard_of_base_models(tmp_path: Path, models_dir: Path) -> None:
    from tuneloop.models import resolve_base

    copy = tmp_path / "saved-copy"
    shutil.copytree(resolve_base("builtin:tiny-llama", models_dir).location, copy)
    result = run(
        "evaluate",
        "--models",
        f"builtin:tiny-llama,{copy}",
        "--data",
        str(ASSETS / "tiny_qa.jsonl"),
        "--set",
        "eval.max_examples=4",
        "--set",
        "eval.max_new_tokens=4",
        home=tmp_path / "home",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 base models on tiny_qa.jsonl, ranked by rougeL (higher is better)" in result.stdout
    assert "│    1 │ " in result.stdout and "│    2 │ " in result.stdout and "builtin:tiny-llama" in result.stdout
    assert "experiment 'tuneloop-model-selection'" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tuneloop-model-selection").experiment_id])
    assert sorted(r.data.tags.get("tuneloop.model", "") for r in runs) == sorted(["", "builtin:tiny-llama", str(copy)])


def test_evaluate_refuses_a_missing_eval_set(tmp_path: Path) -> None:
    result = run(
        "evaluate", "--models", "builtin:tiny-llama", "--data", str(tmp_path / "none.jsonl"), home=tmp_path / "home"
    )
    assert result.returncode == 1 and "none.jsonl does not exist" in result.stdout


def test_prompt_commands_register_list_show_and_diff(tmp_path, models_dir) -> None:
    from typer.testing import CliRunner

    from tuneloop.cli import app

    home = tmp_path / "home"
    opts = ["--set", f"home={home}"]
    one = tmp_path / "v1.yaml"
    one.write_text('- {role: system, content: "Answer for {{product}}."}\n- {role: user, content: "Q: {{input}}"}\n')
    two = tmp_path / "v2.txt"
    two.write_text("Answer in one word: {{input}}")
    runner = CliRunner()
    r = runner.invoke(
        app, ["prompt", "register", "support", "-f", str(one), "-m", "first", "--alias", "champion", *opts]
    )
    assert r.exit_code == 0 and "Registered support/1" in r.output, r.output
    r = runner.invoke(app, ["prompt", "register", "support", "-f", str(one), "-m", "again", *opts])
    assert r.exit_code == 0 and "Unchanged" in r.output
    assert runner.invoke(app, ["prompt", "register", "support", "-f", str(two), "-m", "text", *opts]).exit_code == 0
    listed = runner.invoke(app, ["prompt", "list", *opts])
    assert listed.exit_code == 0 and "support" in listed.output
    shown = runner.invoke(app, ["prompt", "show", "support@champion", *opts])
    assert shown.exit_code == 0 and "Answer for {{product}}." in shown.output and "first" in shown.output
    diff = runner.invoke(app, ["prompt", "diff", "support/1", "support/2", *opts])
    assert diff.exit_code == 0 and "-- role: system" in diff.output and "+  content: 'Answer in one word" in diff.output
    missing = runner.invoke(app, ["prompt", "show", "support/7", *opts])
    assert missing.exit_code == 1 and "No prompt version support/7" in missing.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {role: wizard, content: x}\n")
    r = runner.invoke(app, ["prompt", "register", "support", "-f", str(bad), "-m", "x", *opts])
    assert r.exit_code == 2 and "bad.yaml" in r.output


@pytest.mark.slow  # ten CLI processes, two Prefect flows: ~2 minutes
def test_docs_ingest_list_search_and_a_prompt_that_binds_the_collection(tmp_path: Path) -> None:
    home, docs = tmp_path / "home", tmp_path / "docs"
    docs.mkdir()
    (docs / "office.md").write_text("# Office\n\nThe Lisbon office opens at 9 am on weekdays.")
    (docs / "shipping.txt").write_text("Parcels to Canada arrive in 5 to 7 business days.")
    first = run("docs", "ingest", str(docs), "--collection", "handbook", home=home)
    assert first.returncode == 0, first.stderr
    assert "collection handbook version" in first.stdout and "2 added" in first.stdout
    again = run("docs", "ingest", str(docs), "--collection", "handbook", home=home)
    assert "0 added, 0 updated, 0 removed, 2 unchanged" in again.stdout, again.stdout + again.stderr
    assert "handbook" in run("docs", "list", home=home).stdout
    found = run("docs", "search", "handbook", "when do parcels reach Canada", "-k", "1", home=home)
    assert found.returncode == 0 and "shipping.txt:0" in found.stdout and "office.md" not in found.stdout
    assert run("docs", "ingest", str(tmp_path / "nowhere"), "--collection", "handbook", home=home).returncode == 1
    assert run("docs", "search", "nope", "x", home=home).returncode == 1
    labelled = tmp_path / "q.jsonl"
    labelled.write_text('{"question": "When do parcels reach Canada?", "relevant": ["shipping.txt"]}\n')
    scored = run("docs", "evaluate", "handbook", "-q", str(labelled), "-k", "1", home=home)
    assert scored.returncode == 0 and "recall_at_k 1.000" in scored.stdout, scored.stdout + scored.stderr
    strict = run(
        "docs", "evaluate", "handbook", "-q", str(labelled), "--set", "collections.rules=['mrr > 1']", home=home
    )
    assert strict.returncode == 1 and "FAIL: mrr > 1" in strict.stdout

    template = tmp_path / "rag.yaml"
    template.write_text(
        "messages:\n"
        '  - {role: system, content: "Answer from the context, citing [n].\\n\\n{{context}}"}\n'
        '  - {role: user, content: "{{input}}"}\n'
        "retrieval: {collection: handbook, k: 2}\n"
    )
    r = run("prompt", "register", "support", "-f", str(template), "-m", "rag", home=home)
    assert r.returncode == 0 and "retrieves 2 chunks of handbook" in r.stdout, r.stdout + r.stderr
    r = run("prompt", "register", "other", "-f", str(template), "-m", "x", "--collection", "missing", home=home)
    assert r.returncode == 2 and "no collection 'missing'" in r.stdout
