"""Prompt versions: rendering (variables, few-shot, wrapped input) and the real MLflow Prompt Registry on SQLite."""

from pathlib import Path

import pytest

from tasks.prompts import (
    PromptNotFound,
    list_prompts,
    parse_ref,
    prompt_diff,
    prompt_versions,
    read_template_file,
    register_prompt,
    resolve_prompt,
)
from tests.conftest import make_config
from tuneloop.prompts import PromptSpec, PromptVariablesError

SUPPORT = [
    {"role": "system", "content": "You answer for {{product}}. Be brief."},
    {"role": "user", "content": "Q: Is the sky blue?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Q: {{input}}"},
]


def test_a_template_wraps_the_last_user_message_after_the_history() -> None:
    spec = PromptSpec.from_template("support", "1", SUPPORT)
    assert spec.variables == ["product"] and spec.wraps_input and spec.ref == "support/1"
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Is water wet? {{product}}"},
    ]
    out = spec.render(history, {"product": "Acme"})
    assert out[0] == {"role": "system", "content": "You answer for Acme. Be brief."}
    assert out[1:3] == SUPPORT[1:3]  # the few-shot pair
    assert out[3:5] == history[:2]  # earlier turns before the wrapped question
    # one pass: what the client wrote is never substituted into
    assert out[5] == {"role": "user", "content": "Q: Is water wet? {{product}}"}


def test_a_plain_system_prompt_is_followed_by_the_client_messages() -> None:
    spec = PromptSpec.from_template("plain", "2", [{"role": "system", "content": "Answer in French."}])
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    assert spec.render(msgs) == [{"role": "system", "content": "Answer in French."}, *msgs]
    text = PromptSpec.from_template("text", "1", "Answer briefly: {{input}}")
    assert text.render_text("2+2?") == [{"role": "user", "content": "Answer briefly: 2+2?"}]


@pytest.mark.parametrize(
    "values, words",
    [({}, "missing ['product']"), ({"product": "A", "tone": "x"}, "unknown ['tone']")],
)
def test_variables_not_filled_are_the_callers_error(values, words) -> None:
    spec = PromptSpec.from_template("support", "1", SUPPORT)
    with pytest.raises(PromptVariablesError, match=words.replace("[", r"\[").replace("]", r"\]")):
        spec.render([{"role": "user", "content": "q"}], values)
    with pytest.raises(PromptVariablesError, match="there is none"):
        spec.render([{"role": "assistant", "content": "only me"}], {"product": "A"})


def test_references_parse() -> None:
    assert parse_ref("support") == ("support", None, None)
    assert parse_ref("support/3") == ("support", "3", None)
    assert parse_ref("prompts:/support@champion") == ("support", None, "champion")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, models_dir):
    return make_config(tmp_path_factory.mktemp("prompts") / "home", models_dir)


def test_the_registry_round_trip_on_sqlite(cfg, tmp_path: Path) -> None:
    import os

    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    v1, new = register_prompt(cfg, "support", SUPPORT, "first", author="ana", alias="champion")
    assert new and v1.version == "1"
    again, new = register_prompt(cfg, "support", SUPPORT, "the same again", author="bo")
    assert not new and again == v1  # equal templates: no copy
    shorter = [dict(SUPPORT[0], content="You answer for {{product}}. One sentence."), SUPPORT[3]]
    v2, new = register_prompt(cfg, "support", shorter, "shorter", author="bo")
    assert new and v2.version == "2"
    assert resolve_prompt(cfg, "support@champion") == v1
    assert resolve_prompt(cfg, "support") == v2 == resolve_prompt(cfg, "prompts:/support/2")
    infos = prompt_versions(cfg, "support")
    assert [(i.version, i.author, i.message, i.aliases) for i in infos] == [
        ("1", "ana", "first", ["champion"]),
        ("2", "bo", "shorter", []),
    ]
    assert infos[0].sha256 == v1.sha256
    assert [p.name for p in list_prompts(cfg)] == ["support"]
    diff = prompt_diff(cfg, "support/1", "support/2")
    assert "-  content: You answer for {{product}}. Be brief." in diff and "+++ support/2" in diff
    assert prompt_diff(cfg, "support/1", "support@champion") == ""
    # nothing global was set: a subprocess started later inherits no registry of this test
    assert {k: os.environ.get(k) for k in before} == before
    for missing in ("nope", "support/9", "support@nope"):
        with pytest.raises(PromptNotFound):
            resolve_prompt(cfg, missing)
    f = tmp_path / "p.yaml"
    f.write_text('messages:\n  - {role: system, content: "Hi {{who}}"}\n')
    assert read_template_file(str(f)) == [{"role": "system", "content": "Hi {{who}}"}]
    for bad in ("- {role: wizard, content: x}\n", "- {role: system, content: Hi {{who}}}\n", "7\n"):
        f.write_text(bad)
        with pytest.raises(ValueError, match="p.yaml"):
            read_template_file(str(f))


def test_a_version_whose_template_no_longer_matches_its_hash_is_refused(cfg) -> None:
    import mlflow

    from tuneloop.state import tracking_uri

    spec, _ = register_prompt(cfg, "tampered", "Say {{input}}", "v1")
    uri = tracking_uri(cfg)
    mlflow.MlflowClient(uri, uri).set_prompt_version_tag("tampered", spec.version, "tuneloop.sha256", "0" * 64)
    with pytest.raises(PromptNotFound, match="does not match the hash"):
        resolve_prompt(cfg, "tampered/1")
