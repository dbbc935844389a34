"""A real PostgreSQL server for the tests: Debian's, initialised in a temporary directory,
listening on 127.0.0.1 only, stopped by the session that started it.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user
(created by Debian's package). Each test takes a fresh database (:meth:`PgServer.database`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.dev.standins import free_port
from tests.system import require_program


class PgServer:
    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pwd.getpwnam(self._user)  # KeyError if the package did not create it
            shutil.chown(root, self._user)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(command, capture_output=True, check=False, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stderr.decode(errors='replace')[-500:]}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash
        (recovery from the WAL on the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def database(self) -> str:
        """A new, empty database; its connection URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        db = await asyncpg.connect(self.dsn())
        try:
            await db.execute(f'CREATE DATABASE "{name}"')
        finally:
            await db.close()
        return self.dsn(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    initdb = Path(require_program("initdb", "postgresql", "/usr/lib/postgresql/*/bin/initdb"))
    # Not under pytest's tmp directory: that one is private to root, and the server is not root.
    root = Path(tempfile.mkdtemp(prefix="tracegate-pg-"))
    server = PgServer(initdb.resolve().parent, root)  # beside pg_ctl, whatever symlink led here
    server.init()
    server.start()
    yield server
    with contextlib.suppress(RuntimeError):  # already stopped by a test that failed mid-restart
        server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
