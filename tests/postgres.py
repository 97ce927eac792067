"""Throwaway PostgreSQL servers for tests: initdb + pg_ctl in a temp dir, listening on 127.0.0.1
with password auth, stopped and removed after.

Two builds: Debian's `postgresql` package (`.ci/run` installs it; the MLflow tests) and the
PostgreSQL 16 with pgvector that the `pgserver` wheel ships (a dev dependency; the collection
store's server tests). Without one, the tests that need it skip and say why.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest


def debian_bindir() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def pgvector_bindir() -> Path | None:
    """The binaries of the pgserver wheel: PostgreSQL 16 built with the pgvector extension."""
    spec = importlib.util.find_spec("pgserver")  # not imported: its import sets up a server of its own
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str

    def uri(self, database: str, driver: str = "+psycopg2") -> str:
        """SQLAlchemy's form (MLflow) by default; driver="" gives libpq's, without the password."""
        if not driver:
            return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"
        return f"postgresql{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg2.extensions.connection:
        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database
        )

    def create_database(self, name: str) -> None:
        conn = self.connect()
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def query(self, database: str, sql: str) -> list[tuple]:
        conn = self.connect(database)
        with conn, conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.close()
        return rows


@contextmanager
def running_postgres(bindir: Path | None, user: str, why_missing: str) -> Iterator[Postgres]:
    """A PostgreSQL server of its own on 127.0.0.1, with password auth over TCP."""
    if bindir is None:
        pytest.skip(why_missing)
    # initdb and pg_ctl refuse to run as root: as root, run them as Debian's postgres user.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user (the Debian package creates it)")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not pytest's tmp_path: its parents are private to root, where the postgres user cannot go.
    root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
    if as_user:
        os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
    server = Postgres(port=free_port(), user=user, password=secrets.token_urlsafe(16))
    pwfile = root / "pw"
    pwfile.write_text(server.password)
    if as_user:
        os.chown(pwfile, pg_user.pw_uid, pg_user.pw_gid)
    data, log = root / "data", root / "server.log"

    def run(*argv: str) -> None:
        done = subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}"

    run(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        server.user,
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=trust",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    )
    # Loopback only; the unix socket in the data dir (the default /var/run/postgresql may not be ours).
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-w",
        "-t",
        "60",
        "-o",
        f"-c listen_addresses=127.0.0.1 -p {server.port} -k {data}",
        "start",
    )
    try:
        yield server
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)
