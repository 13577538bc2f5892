"""Running `sdrt serve` in the tests, on 127.0.0.1 only, with the network guard on.

`serving(config)`: the app in this process, uvicorn in a thread (fast; the tests can
reach into its executor). `start_server(artifacts, *flags)`: `sdrt serve` as a
subprocess, exactly as a user starts it. Both fail the test when anything in the
process connected outside loopback (serve_netguard.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from serve_netguard import install

HERE = Path(__file__).resolve().parent
NETGUARD_LOG = Path(tempfile.gettempdir()) / f"sdrt-netguard-{os.getpid()}.log"
install(str(NETGUARD_LOG))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guarded_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: the network guard loaded by sitecustomize."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SDRT_NETGUARD_LOG"] = str(NETGUARD_LOG)
    env.update(extra)
    return env


def assert_loopback_only() -> None:
    text = NETGUARD_LOG.read_text() if NETGUARD_LOG.exists() else ""
    assert not text, f"a connection outside 127.0.0.0/8 was attempted:\n{text}"


def wait_ready(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout} s" + (f":\n{log.read_text()}" if log else ""))


@dataclass
class Server:
    url: str
    port: int
    app: object = None
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def executor(self):
        return self.app.state.executor


@contextlib.contextmanager
def serving(config, app=None) -> Iterator[Server]:
    """The app of `config` served by uvicorn in a thread of this process."""
    import uvicorn

    from sdrt.serve.app import create_app

    app = app or create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.02)
        wait_ready(url)
        yield Server(url, config.port, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert_loopback_only()


@contextlib.contextmanager
def start_server(artifacts: list[Path], *flags: str, port: int | None = None,
                 ready: bool = True, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`sdrt serve ARTIFACTS... --port P FLAGS` as a subprocess; waits for readiness."""
    port = port or free_port()
    log = Path(tempfile.mkstemp(prefix="sdrt-serve-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli.main", "serve", *map(str, artifacts),
                                 "--port", str(port), *flags], stdout=out, stderr=subprocess.STDOUT,
                                env=env or guarded_env())
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_ready(url, proc=proc, log=log)
        yield Server(url, port, proc=proc, log=log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert_loopback_only()
