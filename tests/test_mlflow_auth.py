"""The team MLflow server refuses unsafe credentials before it starts (tuneloop/mlflow_auth.py)."""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.config import REPO_ROOT
from tuneloop.mlflow_auth import AuthSetupError, check_admin_password, render_auth_config

TEMPLATE = REPO_ROOT / "mlflow" / "basic_auth.ini"
GOOD = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-team-password-7",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef0123456789abcdef",
    "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow.internal,127.0.0.1:*",
    "MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg2://mlflow:pw@postgres:5432/mlflow_auth",
}


@pytest.mark.parametrize(
    ("password", "says"),
    [
        ("password1234", "default"),
        ("", "empty"),
        (None, "empty"),
        ("short-pw", "8 characters"),
        ("Administrator", "user name"),
    ],
)
def test_unsafe_admin_passwords_are_refused(password: str | None, says: str) -> None:
    with pytest.raises(AuthSetupError, match=says) as err:
        check_admin_password(password, "administrator")
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in str(err.value)  # names the setting to fix


def test_a_strong_password_passes() -> None:
    check_admin_password("a-long-team-password-7", "admin")


def test_rendered_config_takes_the_database_from_the_environment_and_holds_no_password(tmp_path: Path) -> None:
    out = render_auth_config(TEMPLATE, tmp_path / "run" / "basic_auth.ini", GOOD)
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read(out)
    assert parsed["mlflow"]["database_uri"] == GOOD["MLFLOW_AUTH_DATABASE_URI"]
    assert parsed["mlflow"]["admin_username"] == "admin"
    assert GOOD["MLFLOW_AUTH_ADMIN_PASSWORD"] not in out.read_text()
    assert out.stat().st_mode & 0o077 == 0  # the database password is in it: owner only


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "password1234"),
        ({"MLFLOW_FLASK_SERVER_SECRET_KEY": "short"}, "MLFLOW_FLASK_SERVER_SECRET_KEY is 5 characters"),
        ({"MLFLOW_FLASK_SERVER_SECRET_KEY": None}, "MLFLOW_FLASK_SERVER_SECRET_KEY is unset"),
        ({"MLFLOW_SERVER_ALLOWED_HOSTS": "*"}, "contains '\\*'"),
        ({"MLFLOW_SERVER_ALLOWED_HOSTS": " , "}, "MLFLOW_SERVER_ALLOWED_HOSTS is unset"),
        ({"MLFLOW_AUTH_DATABASE_URI": None}, "MLFLOW_AUTH_DATABASE_URI is unset"),
        ({"MLFLOW_AUTH_ADMIN_USERNAME": "a-long-team-password-7"}, "user name"),
    ],
)
def test_bad_settings_are_refused_and_nothing_is_written(tmp_path: Path, change: dict, says: str) -> None:
    env = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    out = tmp_path / "basic_auth.ini"
    with pytest.raises(AuthSetupError, match=says):
        render_auth_config(TEMPLATE, out, env)
    assert not out.exists()


def test_a_password_written_into_the_template_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "basic_auth.ini"
    template.write_text(TEMPLATE.read_text() + "admin_password = a-long-team-password-7\n")
    with pytest.raises(AuthSetupError, match="admin_password"):
        render_auth_config(template, tmp_path / "out.ini", GOOD)


def test_an_unknown_default_permission_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "basic_auth.ini"
    template.write_text(TEMPLATE.read_text().replace("default_permission = READ", "default_permission = ALL"))
    with pytest.raises(AuthSetupError, match="default_permission 'ALL'"):
        render_auth_config(template, tmp_path / "out.ini", GOOD)


def test_the_entry_point_exits_1_naming_the_problem(tmp_path: Path) -> None:
    env = {**os.environ, **GOOD, "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}
    done = subprocess.run(
        [sys.executable, "-m", "tuneloop.mlflow_auth", "--template", str(TEMPLATE), "--out", str(tmp_path / "out.ini")],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 1
    assert "Refusing to start the MLflow server" in done.stderr and "password1234" in done.stderr
    assert not (tmp_path / "out.ini").exists()


def test_the_check_needs_only_the_standard_library() -> None:
    # The MLflow image copies tuneloop/ without installing its dependencies to run the check.
    tree = ast.parse((REPO_ROOT / "tuneloop" / "mlflow_auth.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_mlflow_folder_is_files_only() -> None:
    assert not list((REPO_ROOT / "mlflow").glob("*.py"))  # a package here would hide the real mlflow
    assert os.access(REPO_ROOT / "mlflow" / "entrypoint.sh", os.X_OK)
