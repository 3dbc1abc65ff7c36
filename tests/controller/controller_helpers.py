"""Controller test helpers: a token, settings against a real Redis, and a real uvicorn controller process
that can be stopped and restarted. (Not named conftest: tests/conftest.py owns that module name.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from services.localproc import free_port, stop_process
from tests.waiting import wait_for

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STANDIN = HERE / "standin_train.py"


def settings_from_env(monkeypatch, env: dict[str, str], **overrides):
    """ControllerSettings.from_env with exactly `env` as the FLOWBP_* variables of this process (for this test)."""
    from services.controller.settings import ENV_PREFIX, ControllerSettings

    for key in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        return ControllerSettings.from_env(**overrides)


def settings_for(redis_url: str, tmp_path: Path, **kw):
    from services.controller.settings import ControllerSettings

    base = dict(redis_url=redis_url, ray_address=f"http://127.0.0.1:{free_port()}",  # nothing listens there
                ray_timeout_s=2.0, submit_retries=1, retry_backoff_s=0.05, reconciler_enabled=False,
                check_registries=False, runs_dir=tmp_path / "runs", spec_dir=tmp_path / "runs" / "_jobs",
                token_env="FLOWBP_TEST_TOKENS")
    base.update(kw)
    return ControllerSettings(**base)


class ControllerProcess:
    """`python -m services.controller.app` as its own process (a real uvicorn server on loopback)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.env = {**os.environ, **env, "FLOWBP_PORT": str(self.port), "FLOWBP_HOST": "127.0.0.1"}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "ControllerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.controller.app"], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._healthy, timeout, f"the controller on {self.url} to answer /healthz (log {self.log_path})")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (a graceful shutdown releases the reconciler lease), or SIGKILL with crash=True (the lease
        then runs out by itself)."""
        stop_process(self.proc, timeout=20, sig=signal.SIGKILL if crash else signal.SIGTERM)
        self.proc = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=120)  # above the controller's Ray timeout


def controller_env(redis_url: str, ray_address: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "FLOWBP_TOKENS": TOKEN,
        "FLOWBP_REDIS_URL": redis_url,
        "FLOWBP_RAY_ADDRESS": ray_address,
        "FLOWBP_RUNS_DIR": str(tmp_path / "runs"),
        "FLOWBP_SPEC_DIR": str(tmp_path / "runs" / "_jobs"),
        "FLOWBP_RECONCILE_INTERVAL_S": "0.5",
        # a loaded Ray job server answers slowly; an unreachable one (a closed port) still fails at once
        "FLOWBP_RAY_TIMEOUT_S": "60",
        "FLOWBP_CHECK_REGISTRIES": "false",
        "FLOWBP_ENTRYPOINT": f"{sys.executable} {STANDIN}",
        "FLOWBP_RUNTIME_ENV": '{"env_vars": {"FLOWBP_STANDIN_STEP_S": "0.4"}}',
    }
    env.update(extra)
    return env


