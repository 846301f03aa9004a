"""Child processes of a benchmark: the sandbox and workers, each on its own interpreter.

Separate processes so the worker, the sandbox and the load generator never share a GIL:
on a 2-core machine that is the only way a figure measures the worker and not its neighbours.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from consumer.sandbox import SandboxControl

__all__ = ["BENCH_TOKEN", "RssSample", "SandboxProcess", "WorkerProcess", "cpu_seconds",
           "read_cpu",
           "read_rss"]

BENCH_TOKEN = "bench-write-token-4c1d"
# Not inherited from the driver's environment (REDIS_URL included: only the Redis workloads
# pass it, so the others measure the worker without Redis whatever the shell exports).
_OUR_PREFIXES = ("KAFKA_", "USERPILOT_", "WORKER_", "SCHEMA_REGISTRY", "REDIS_")


class SandboxProcess:
    """`python -m consumer.sandbox` on a free port; `control` talks to its /_sandbox/ API."""

    def __init__(self, *, tokens: tuple[str, ...] = (BENCH_TOKEN,), rate_limit: int = 0,
                 rate_window_s: float = 60.0, latency_ms: float = 0.0) -> None:
        args = [sys.executable, "-m", "consumer.sandbox", "--port=0", "--log-level=WARNING",
                f"--rate-limit={rate_limit}", f"--rate-window={rate_window_s:g}",
                f"--latency-ms={latency_ms:g}"]
        args += [f"--write-token={t}" for t in tokens]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("sandbox listening on "):
            self.proc.kill()
            raise RuntimeError(f"sandbox did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip()
        self.control = SandboxControl(self.url, timeout=120.0)

    @property
    def host_port(self) -> str:
        return self.url.split("://", 1)[1]

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def worker_env(*, bootstrap: str, registry: str, sandbox: str, topic: str, group: str,
               **extra: str) -> dict[str, str]:
    """The worker's environment for a benchmark run; `extra` overrides any default."""
    env = {
        "USERPILOT_API_KEY": BENCH_TOKEN,
        "USERPILOT_ANALYTICS_ENDPOINT": sandbox,
        "USERPILOT_INSECURE_HTTP": "true",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "SCHEMA_REGISTRY_URL": registry,
        "WORKER_METRICS_PORT": "0",
        "WORKER_LOG_LEVEL": "warning",
    }
    env.update(extra)
    return env


class WorkerProcess:
    """`python -m consumer run` (or another `module`, or a `script` with its arguments) with
    an environment, output to a log."""

    def __init__(self, env: Mapping[str, str], log_path: Path,
                 module: tuple[str, ...] = ("consumer", "run"), *,
                 script: tuple[str, ...] | None = None) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(_OUR_PREFIXES)}
        full_env.update(env)
        argv = [sys.executable, *script] if script is not None else [sys.executable, "-m", *module]
        self.proc = subprocess.Popen(argv, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the worker drains and commits), SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, for runs whose figures are taken already (no drain, no final commit)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass(frozen=True)
class RssSample:
    """Resident set now and its high-water mark, in bytes (from /proc/<pid>/status)."""

    at_s: float
    rss: int
    hwm: int


def read_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far; NaN once gone.

    On a machine shared with other work, CPU per event is steadier than events per wall
    second: the benchmark reports both.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_rss(pid: int, at_s: float = 0.0) -> RssSample | None:
    """VmRSS and VmHWM of a process, or None once it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    if "VmRSS" not in values or "VmHWM" not in values:
        return None
    return RssSample(at_s, values["VmRSS"], values["VmHWM"])


@dataclass
class RssTrace:
    """RSS over time; `plateaued` says whether the last third added less than `slack`."""

    samples: list[RssSample] = field(default_factory=list)

    def add(self, sample: RssSample) -> None:
        self.samples.append(sample)

    @property
    def peak_hwm(self) -> int:
        return max((s.hwm for s in self.samples), default=0)

    def plateaued(self, slack: float = 0.05) -> bool:
        if len(self.samples) < 9:
            return False
        cut = len(self.samples) * 2 // 3
        before = max(s.hwm for s in self.samples[:cut])
        return self.peak_hwm <= before * (1 + slack)
