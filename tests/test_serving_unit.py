"""Serving pieces that need no Ray: keys, rate limits, the Serve config tuneloop writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.guard import KeyRing, RateLimiter
from tuneloop.apikeys import key_sha256, keys_from_env, new_key
from tuneloop.config import ConfigError, load_config
from tuneloop.seams import Routing, ServedVersions
from tuneloop.servespec import serve_config

SERVE_CONFIG = Path(__file__).parent.parent / "infra" / "serve" / "serve-config.yaml"


def test_keys_are_kept_hashed_and_identified_by_hash() -> None:
    key = new_key()
    ring = KeyRing([{"id": "a", "sha256": key_sha256(key)}, {"id": "b", "sha256": key_sha256("other")}])
    assert ring.identify(key).id == "a" and ring.identify("other").id == "b"
    assert ring.identify(key + "x") is None
    assert key not in repr(ring.entries)


def test_keys_from_the_environment_are_hashed_at_once() -> None:
    entries = keys_from_env("team-a:secret1, team-b:secret2")
    assert entries == [
        {"id": "team-a", "sha256": key_sha256("secret1")},
        {"id": "team-b", "sha256": key_sha256("secret2")},
    ]
    assert keys_from_env("review:secret3:feedback+infer") == [
        {"id": "review", "sha256": key_sha256("secret3"), "scopes": ["feedback", "infer"]}
    ]
    assert keys_from_env(None) == [] and keys_from_env("") == []
    with pytest.raises(ValueError, match="expected `id:key`"):
        keys_from_env("no-separator")


def test_scopes_say_what_a_key_may_do() -> None:
    ring = KeyRing(
        [
            {"id": "app", "sha256": key_sha256("k1")},
            {"id": "review", "sha256": key_sha256("k2"), "scopes": ["feedback"]},
            {"id": "ops", "sha256": key_sha256("k3"), "scopes": ["admin"]},
        ]
    )
    app, review, ops = ring.identify("k1"), ring.identify("k2"), ring.identify("k3")
    assert app.scopes == ("infer",) and app.may("infer") and not app.may("feedback") and not app.may("admin")
    assert review.may("feedback") and not review.may("infer")
    assert all(ops.may(s) for s in ("infer", "feedback", "admin"))  # admin may do everything
    with pytest.raises(ConfigError, match="scopes"):
        load_config(None, ["serve.api_keys=[{id: a, sha256: " + "0" * 64 + ", scopes: [root]}]"])


def test_rate_limiter_allows_a_burst_then_says_how_long_to_wait() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("k")
    assert wait == pytest.approx(1.0)  # one request a second
    assert limiter.take("other") == 0.0  # per key
    now[0] += 1.0
    assert limiter.take("k") == 0.0
    assert limiter.take("k", per_minute=6) > 0  # a key's own, lower limit


def test_canary_rules_are_checked_at_config_load() -> None:
    with pytest.raises(ConfigError, match="unknown metric rougeL"):
        load_config(None, ["serve.rollout.rules=['rougeL >= 0.1']"])
    cfg = load_config(None, ["serve.rollout.mode=shadow", "serve.rollout.share=0.25"])
    assert cfg.serve.rollout.mode == "shadow"


def test_the_serve_config_tuneloop_writes_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config(None, ["serve.autoscaling={min_replicas: 1, max_replicas: 4, target_ongoing_requests: 4}"])
    config = serve_config(
        cfg,
        {"config": "configs/local.yaml"},
        ServedVersions(adapters={"3": "models:/m/3"}, default="3"),
        Routing.only("3"),
    )
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serving.app:app_builder" and app.route_prefix == "/"
    model = next(d for d in app.deployments if d.name == "ModelServer")
    assert model.autoscaling_config["max_replicas"] == 4 and model.user_config["adapters"] == {"3": "models:/m/3"}
    assert schema.http_options.host == "127.0.0.1"


def test_the_committed_serve_config_is_what_the_default_config_renders() -> None:
    """infra/serve/serve-config.yaml is `tuneloop serve-config` of configs/local.yaml."""
    from ray.serve.schema import ServeDeploySchema

    committed = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(committed)
    rendered = serve_config(load_config(None), {"config": "configs/local.yaml"})
    assert committed == rendered


def test_a_keys_file_rotates_and_revokes_keys_without_a_restart(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tuneloop.cli import app

    path = tmp_path / "keys.yaml"
    ring = KeyRing([], path, recheck_s=0)
    assert ring and ring.identify("anything") is None  # a keys file turns keys on, even before it exists
    out = CliRunner().invoke(app, ["api-key", "new", "--id", "team-a", "--file", str(path)])
    assert out.exit_code == 0, out.output
    key = next(w for w in out.output.split() if w.startswith("tl-"))
    assert ring.identify(key).id == "team-a"
    rotated = CliRunner().invoke(app, ["api-key", "new", "--id", "team-a", "--scope", "admin", "--file", str(path)])
    new_key_ = next(w for w in rotated.output.split() if w.startswith("tl-"))
    assert ring.identify(key) is None and ring.identify(new_key_).scopes == ("admin",)  # the old one stops
    good = path.read_text()
    path.write_text("{not: [valid")  # a broken edit keeps the last good keys
    assert ring.identify(new_key_) is not None
    refused = CliRunner().invoke(app, ["api-key", "new", "--id", "team-b", "--file", str(path)])
    assert refused.exit_code == 1 and "left as it is" in refused.output  # never overwrites what it cannot read
    path.write_text(good)
    assert CliRunner().invoke(app, ["api-key", "revoke", "--id", "team-a", "--file", str(path)]).exit_code == 0
    assert CliRunner().invoke(app, ["api-key", "revoke", "--id", "nobody", "--file", str(path)]).exit_code == 1
    assert ring.identify(new_key_) is None and ring.entries == []  # revoked
    CliRunner().invoke(app, ["api-key", "new", "--id", "team-c", "--file", str(path)])
    assert ring.identify("x") is None and [e.id for e in ring.entries] == ["team-c"]
    path.unlink()
    assert ring.identify("x") is None and ring.entries == []  # the file is gone: none of its keys


def test_stop_strings_cut_the_text_and_streams_hold_back_what_may_begin_one() -> None:
    from serving.engine import cut_at_stop, partial_stop

    assert cut_at_stop("Paris.\nQ: next", ("\nQ:", "###")) == ("Paris.", True)
    assert cut_at_stop("a ### b \nQ:", ("\nQ:", "###")) == ("a ", True)  # the first one in the text
    assert cut_at_stop("no stop here", ("###",)) == ("no stop here", False)
    assert partial_stop("Paris.\nQ", ("\nQ:",)) == 2  # "\nQ" may become "\nQ:": held back
    assert partial_stop("Paris.#", ("###", "\nQ:")) == 1
    assert partial_stop("Paris.", ("###",)) == 0


def test_the_readme_compatibility_table_is_the_code_s() -> None:
    from serving.app import compatibility_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- compatibility:start -->\n", 1)[1].split("<!-- compatibility:end -->", 1)[0]
    assert table == compatibility_table(), "regenerate README's table: python -c 'from serving.app import …'"


def test_token_budgets_count_per_key_and_renew_each_utc_day() -> None:
    from serving.guard import TokenBudgets

    now = [1_800_000_000.0]  # 2027-01-15 08:00 UTC
    budgets = TokenBudgets(clock=lambda: now[0])
    assert not budgets.known("a")
    budgets.seed("a", 90)  # what the log says it used today
    budgets.seed("a", 0)  # seeded once a day: a later seed changes nothing
    budgets.add("a", 15)
    assert budgets.known("a") and budgets.spent("a") == 105 and budgets.spent("b") == 0
    now[0] += 86_400
    assert budgets.spent("a") == 0 and not budgets.known("a")  # a new day
