"""Start and stop the local servers FlowBP needs (Redis, a Ray head), on loopback, owned by pid.

Used by the tests (one Ray per pytest session), by `make serve` and by benchmarks. There is no systemd on our
machines, so we start each server ourselves on a free port and stop it by the pid we recorded; nothing here ever
binds an external interface.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Ray 2.60 binds the machine's external address unless this is 0, and refuses `ray job submit` without a
# token unless auth is disabled consistently for cluster and client.
RAY_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen | None, *, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to a server we started and wait up to `timeout` s for it to exit; SIGKILL it if it does not."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def apply_ray_env() -> None:
    for k, v in RAY_LOCAL_ENV.items():
        os.environ.setdefault(k, v)


def init_local_ray(*, num_cpus: float | None, object_store_mb: int, **kw) -> None:
    """Start a Ray instance of this process's own on loopback, whatever else runs on the machine.

    `address="local"`: without it `ray.init()` joins a cluster that `ray start` left on the machine (or the one
    `RAY_ADDRESS` names) and then refuses `num_cpus`, so a laptop with another Ray running could not run the demo."""
    import ray

    apply_ray_env()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
             _node_ip_address=LOOPBACK, **kw)


@dataclass
class RedisServer:
    """A real redis-server on a loopback port with an append-only file, restartable on the same data dir."""

    port: int = field(default_factory=free_port)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flowbp-redis-")))
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make setup` (apt-get install -y redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.data_dir),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes",
               "--daemonize", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)  # redis flushes the AOF on SIGTERM
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class RayHead:
    """A local `ray start --head` on loopback with the job server (for `ray job submit` and JobSubmissionClient)."""

    num_cpus: int = 4
    object_store_mb: int = 512
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    # where the head's metrics agent serves Prometheus text (Ray's system metrics and every ray.util.metrics)
    metrics_export_port: int = field(default_factory=free_port)
    temp_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the head, e.g. RAY_REDIS_ADDRESS
    started: bool = False

    def __post_init__(self) -> None:
        # A temp dir of our own (short: Ray's unix socket paths must stay under ~107 chars) marks every process
        # of this cluster, so stop() ends ours without `ray stop`, which would kill every Ray on the machine.
        if self.temp_dir is None:
            self.temp_dir = Path(f"/tmp/fbray{self.port}")

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def _ray_bin(self) -> str:
        local = Path(sys.executable).with_name("ray")
        return str(local) if local.exists() else (shutil.which("ray") or "ray")

    def start(self, timeout: float = 120.0) -> "RayHead":
        apply_ray_env()
        env = {**os.environ, **RAY_LOCAL_ENV, **self.env}
        cmd = [self._ray_bin(), "start", "--head", f"--node-ip-address={LOOPBACK}", f"--port={self.port}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
               "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
               # Fixed defaults (agent 52365, metrics 8080, ...) collide with other Ray heads on a shared machine,
               # and a job agent that cannot bind answers every submit with "No available agent".
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={self.metrics_export_port}", f"--runtime-env-agent-port={free_port()}"]
        cmd.append(f"--temp-dir={self.temp_dir}")
        # From here on, whatever fails, stop() ends what was started: a half-started head must never outlive
        # its caller (the fixture's teardown does not run when start() raises).
        self.started = True
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise RuntimeError(f"`ray start --head` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
            self._wait_for_job_server(timeout)
            self.wait_for_job_agent(max(timeout, 240.0))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_job_server(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"Ray job server at {self.dashboard_url} did not come up: {last}")

    def wait_for_job_agent(self, timeout: float = 60.0) -> None:
        """The job server answers before its agent can take jobs ("No available agent"): submit a no-op until
        one is accepted, so callers can submit at once. Plain HTTP with a timeout on every request: Ray's
        JobSubmissionClient has none, and on a loaded machine a read can hang forever."""
        import json
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        body = json.dumps({"entrypoint": "true"}).encode()
        last = ""
        job_id = None
        while job_id is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray job agent never accepted a job within {timeout:.0f}s: {last}")
            req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=15) as r:
                    job_id = json.loads(r.read())["submission_id"]
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                last = str(e)
                time.sleep(1.0)
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/{job_id}", timeout=15) as r:
                    if json.loads(r.read()).get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.3)

    def pids_of(self, program: str) -> list[int]:
        """Live processes of this cluster whose executable is named `program` (e.g. "gcs_server", "raylet")."""
        found = []
        for pid in self._our_pids():
            try:
                exe = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0", 1)[0]
                state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if os.path.basename(exe.decode(errors="replace")) == program and state != "Z":
                found.append(pid)
        return found

    def submit_job(self, entrypoint: str, submission_id: str, runtime_env: dict | None = None) -> str:
        """Submit a job over the job server's REST API (a timeout on every request, unlike JobSubmissionClient)."""
        body = {"entrypoint": entrypoint, "submission_id": submission_id, "runtime_env": runtime_env or {}}
        return self._job_api("", body)["submission_id"]

    def job_status(self, submission_id: str) -> str | None:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED; None while the job server does not answer."""
        try:
            return self._job_api(submission_id)["status"]
        except OSError:
            return None

    def job_logs(self, submission_id: str) -> str:
        return self._job_api(f"{submission_id}/logs")["logs"]

    def _job_api(self, path: str, body: dict | None = None) -> dict:
        import json
        import urllib.request

        req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def _our_pids(self) -> list[int]:
        """Processes naming our temp dir or GCS address, plus all their descendants (workers rename themselves)."""
        markers = (str(self.temp_dir).encode(), self.gcs_address.encode())
        parent: dict[int, int] = {}
        ours: set[int] = set()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmdline = (d / "cmdline").read_bytes()
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if any(m in cmdline for m in markers) or self._holds_file_under_temp_dir(d):
                ours.add(int(d.name))
        grew = True
        while grew:
            kids = {pid for pid, pp in parent.items() if pp in ours and pid not in ours}
            grew = bool(kids)
            ours |= kids
        return sorted(ours)

    def _holds_file_under_temp_dir(self, proc_dir: Path) -> bool:
        # Ray's agents rename themselves (ray::DashboardAgent) and outlive the raylet as orphans; their open log
        # files under our temp dir still identify them.
        prefix = str(self.temp_dir)
        try:
            for fd in (proc_dir / "fd").iterdir():
                try:
                    if os.readlink(fd).startswith(prefix):
                        return True
                except OSError:
                    continue
        except OSError:
            pass
        return False

    def stop(self, timeout: float = 20.0) -> None:
        """End every process of this cluster (and only this one), then remove its temp dir."""
        if not self.started:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._our_pids():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
            while self._our_pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        self.started = False
        shutil.rmtree(self.temp_dir, ignore_errors=True)
