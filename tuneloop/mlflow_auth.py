"""Refuse a team MLflow server whose credentials are unsafe, then write the auth config it reads.

    python -m tuneloop.mlflow_auth --template mlflow/basic_auth.ini --out /tmp/mlflow/basic_auth.ini

The MLflow image runs this before `mlflow server --app-name basic-auth` (mlflow/entrypoint.sh):
it exits 1, naming the setting to fix, when the admin password is MLflow's old default
(`password1234`, GHSA-gq3w-7jj3-x7gr), empty, shorter than 12 characters or the user name;
when the Flask secret key is missing or short; when the allowed hosts are missing or `*`.
It then writes the auth config with the user store's database URI taken from the environment,
so no credential sits in a file. The admin password itself stays in the environment, where
MLflow reads it (MLFLOW_AUTH_ADMIN_PASSWORD).

Standard library only: the MLflow image installs tuneloop without its dependencies for this.
"""

from __future__ import annotations

import argparse
import configparser
import os
from collections.abc import Mapping
from pathlib import Path

# Shipped in basic_auth.ini by older MLflow releases, so publicly known.
LEGACY_DEFAULT_PASSWORD = "password1234"
MIN_PASSWORD_CHARS = 12  # MLflow's own password policy (it refuses shorter user passwords)
MIN_SECRET_KEY_CHARS = 32  # 32 characters: what `openssl rand -hex 16` gives
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "DENY", "NO_PERMISSIONS")  # mlflow.server.auth.permissions


class AuthSetupError(ValueError):
    """A setting of the MLflow server that must not be used."""


def check_admin_password(password: str | None, username: str) -> None:
    """Raise AuthSetupError when `password` must not protect the admin account `username`."""
    fix = "set MLFLOW_AUTH_ADMIN_PASSWORD to a new password, e.g. `openssl rand -base64 24`"
    if not password:
        raise AuthSetupError(f"MLflow admin password for {username!r} is empty or unset: {fix}")
    if password == LEGACY_DEFAULT_PASSWORD:
        raise AuthSetupError(
            f"MLflow admin password for {username!r} is {LEGACY_DEFAULT_PASSWORD!r}, the default "
            f"older MLflow releases shipped (publicly known): {fix}"
        )
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthSetupError(
            f"MLflow admin password for {username!r} has {len(password)} characters "
            f"(at least {MIN_PASSWORD_CHARS}): {fix}"
        )
    if password.casefold() == username.casefold():
        raise AuthSetupError(f"MLflow admin password is the user name {username!r}: {fix}")


def check_secret_key(key: str | None) -> None:
    """Raise AuthSetupError unless `key` can sign the basic-auth app's CSRF tokens."""
    if not key or len(key) < MIN_SECRET_KEY_CHARS:
        raise AuthSetupError(
            f"MLFLOW_FLASK_SERVER_SECRET_KEY is {'unset' if not key else f'{len(key)} characters'} "
            f"(at least {MIN_SECRET_KEY_CHARS}; the same on every server process): "
            "set it, e.g. `openssl rand -hex 32`"
        )


def check_allowed_hosts(hosts: str | None) -> None:
    """Raise AuthSetupError unless `hosts` names the Host headers the server answers."""
    names = [h.strip() for h in (hosts or "").split(",") if h.strip()]
    if not names:
        raise AuthSetupError(
            "MLFLOW_SERVER_ALLOWED_HOSTS is unset: list the host names clients use, "
            "e.g. mlflow.internal,mlflow.internal:5000 (a guard against DNS rebinding)"
        )
    if "*" in names:
        raise AuthSetupError("MLFLOW_SERVER_ALLOWED_HOSTS contains '*': list the host names clients use instead")


def render_auth_config(template: Path, out: Path, env: Mapping[str, str]) -> Path:
    """Check the server's credentials in `env` and write the auth config MLflow reads to `out`.

    `out` is the template with `database_uri` set from MLFLOW_AUTH_DATABASE_URI; it holds no
    password. Nothing is written when a check fails.
    """
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(template):
        raise AuthSetupError(f"Auth config template {template} does not exist")
    if not parser.has_section("mlflow"):
        raise AuthSetupError(f"Auth config template {template} has no [mlflow] section")
    section = parser["mlflow"]
    if section.get("admin_password"):
        raise AuthSetupError(
            f"{template} sets admin_password: remove it (a file in the image is no place "
            "for a password) and pass MLFLOW_AUTH_ADMIN_PASSWORD from a secret"
        )
    permission = section.get("default_permission", "")
    if permission not in PERMISSIONS:
        raise AuthSetupError(f"{template}: default_permission {permission!r} is not one of {', '.join(PERMISSIONS)}")
    # The environment wins over the file, as in MLflow itself.
    username = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or section.get("admin_username") or ""
    if not username:
        raise AuthSetupError("No MLflow admin user name: set MLFLOW_AUTH_ADMIN_USERNAME or admin_username")
    check_admin_password(env.get("MLFLOW_AUTH_ADMIN_PASSWORD"), username)
    check_secret_key(env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"))
    check_allowed_hosts(env.get("MLFLOW_SERVER_ALLOWED_HOSTS"))
    database_uri = env.get("MLFLOW_AUTH_DATABASE_URI")
    if not database_uri:
        raise AuthSetupError(
            "MLFLOW_AUTH_DATABASE_URI is unset: the user store's database, e.g. "
            "postgresql+psycopg2://mlflow:...@postgres:5432/mlflow_auth"
        )
    section["database_uri"] = database_uri
    out.parent.mkdir(parents=True, exist_ok=True)
    # The database URI carries the database password: readable by this user only.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        parser.write(f)
    return out


def main(argv: list[str] | None = None) -> None:
    """Check the team MLflow server's settings and write its auth config; exit 1 naming what to fix."""
    args = argparse.ArgumentParser(description=main.__doc__)
    args.add_argument("--template", type=Path, required=True, help="basic_auth.ini without credentials")
    args.add_argument("--out", type=Path, required=True, help="where to write the config MLflow reads")
    ns = args.parse_args(argv)
    try:
        render_auth_config(ns.template, ns.out, os.environ)
    except AuthSetupError as err:
        raise SystemExit(f"Refusing to start the MLflow server: {err}") from None


if __name__ == "__main__":
    main()
