#!/usr/bin/env python3
"""Start and stop a real single-node Kafka (KRaft), Apicurio Registry and Redis on 127.0.0.1.

Why this exists: tests, the demo and CI need the real broker and a Confluent-compatible
schema registry, but the machine has no Docker and no internet beyond package registries.
Both servers are therefore assembled from Maven Central and run as plain JVM processes.

Stdlib only, so it runs before the virtualenv exists. Downloads are cached in
``${XDG_CACHE_HOME:-~/.cache}/userpilot-worker/`` (shared by every clone on the machine);
runtime state (data, pid files, logs) lives in ``<repo>/.run/services/``.

    python3 services/ctl.py up [kafka|registry|redis|all] [--record FILE] [--keep-data]
    python3 services/ctl.py down [kafka|registry|redis|all] [--from FILE]
    python3 services/ctl.py kill|freeze|thaw kafka|registry|redis   (fault tests)
    python3 services/ctl.py status
    python3 services/ctl.py env [--export]

`up --keep-data` restarts a stopped (or killed) broker on the data it had, so tests can
restart Kafka mid-delivery; plain `up` always starts a fresh cluster. `kill` is SIGKILL
(a crash; the data stays), `freeze`/`thaw` are SIGSTOP/SIGCONT (a hung process).

Environment: KAFKA_PORT (19092; the controller uses KAFKA_PORT+1), REGISTRY_PORT (18081),
REDIS_PORT (16379; Debian's ``redis-server``, which `make sysdeps` installs); unset, a port
is the one the run dir's last `up` of that service used, else the default in brackets;
SERVICES_RUN_DIR (the run dir, ``<repo>/.run/services``),
SERVICES_START_TIMEOUT (seconds, 180), KAFKA_JAVA_OPTS / REGISTRY_JAVA_OPTS (extra JVM flags).

Apicurio 3.0.9 rather than 3.3.x (the only other 3.x releases on Maven Central): 3.3.x is
compiled for Java 21 and only Java 17 is installable here (Debian bookworm); 3.0.9 runs on
Java 17 and serves the same ``/apis/ccompat/v7`` API.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# SERVICES_RUN_DIR: a second, separate set of services (fault tests start their own broker
# or registry to kill or freeze, beside the shared ones of `make test`).
RUN_DIR = Path(os.environ.get("SERVICES_RUN_DIR") or REPO / ".run" / "services")
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "userpilot-worker"
)
KAFKA_POM = HERE / "kafka-pom.xml"
REGISTRY_VERSION = "3.0.9"
REGISTRY_ARTIFACT = f"io.apicurio:apicurio-registry-app:{REGISTRY_VERSION}:tar.gz:all"
CCOMPAT_PATH = "/apis/ccompat/v7"
HOST = "127.0.0.1"
ALL = ("kafka", "registry", "redis")


class ServiceError(RuntimeError):
    """A service could not be downloaded, started or checked; the message says where to look."""


def log(msg: str) -> None:
    print(f"[services] {msg}", file=sys.stderr, flush=True)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ServiceError(f"{name}={raw!r} is not an integer") from None


def _port(name: str, service: str, default: int) -> int:
    """The port variable if set, else the port this run dir's last `up` of the service used
    (`<service>.port`), else the default: `env` after a `kill` printed the default port,
    not the one the run dir's service had (review "faults28")."""
    if os.environ.get(name, "").strip():
        return _env_int(name, default)
    with contextlib.suppress(OSError, ValueError):
        return int((RUN_DIR / f"{service}.port").read_text().strip())
    return default


def kafka_port() -> int:
    return _port("KAFKA_PORT", "kafka", 19092)


def controller_port() -> int:
    return kafka_port() + 1


def registry_port() -> int:
    return _port("REGISTRY_PORT", "registry", 18081)


def redis_port() -> int:
    return _port("REDIS_PORT", "redis", 16379)


def redis_url(port: int | None = None) -> str:
    return f"redis://{HOST}:{port or redis_port()}/0"


def start_timeout() -> float:
    return float(_env_int("SERVICES_START_TIMEOUT", 180))


def bootstrap_servers(port: int | None = None) -> str:
    return f"{HOST}:{port or kafka_port()}"


def registry_url(port: int | None = None) -> str:
    return f"http://{HOST}:{port or registry_port()}{CCOMPAT_PATH}"


# --------------------------------------------------------------------------- downloads


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Serialise work on shared state (the cache, the run dir) between concurrent callers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _require_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise ServiceError(
            f"'{name}' is not on PATH; install Java 17+ and Maven (`make sysdeps` does it as root)"
        )
    return found


def _mvn(args: list[str], cwd: Path, log_file: Path) -> None:
    cmd = [_require_tool("mvn"), "-q", "-B", *args]
    with log_file.open("w") as out:
        rc = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-20:]
        raise ServiceError(f"maven failed ({rc}): {' '.join(cmd)}\n  log: {log_file}\n"
                           + "\n".join(tail))


def _cached(name: str, stamp: str, fill: Callable[[Path], None]) -> Path:
    """Return ``CACHE_DIR/name``, filling it once via ``fill(tmpdir)``.

    The directory only appears (atomic rename) after ``fill`` succeeded and the stamp was
    written, so an interrupted download is never mistaken for a complete one.
    """
    final = CACHE_DIR / name
    marker = final / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return final
    with _flock(CACHE_DIR / ".lock"):
        if marker.is_file() and marker.read_text() == stamp:
            return final
        for stale in CACHE_DIR.glob(f".{name}.partial-*"):  # left by a killed download
            shutil.rmtree(stale, ignore_errors=True)
        tmp = CACHE_DIR / f".{name}.partial-{os.getpid()}"
        tmp.mkdir(parents=True)
        log(f"downloading {name} into {CACHE_DIR} (once per machine)")
        started = time.monotonic()
        try:
            fill(tmp)
            (tmp / ".complete").write_text(stamp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"downloaded {name} in {time.monotonic() - started:.1f}s")
    return final


def _kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    for dep in ET.parse(KAFKA_POM).getroot().iterfind("m:dependencies/m:dependency", ns):
        if dep.findtext("m:artifactId", namespaces=ns) == "kafka_2.13":
            return dep.findtext("m:version", default="unknown", namespaces=ns)
    raise ServiceError(f"{KAFKA_POM} has no kafka_2.13 dependency")


def kafka_libs() -> Path:
    """The broker classpath directory (jars), downloaded on first use."""
    stamp = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()

    def fill(tmp: Path) -> None:
        _mvn(["-f", str(KAFKA_POM), "dependency:copy-dependencies",
              f"-DoutputDirectory={tmp / 'libs'}", "-DincludeScope=runtime"],
             cwd=tmp, log_file=CACHE_DIR / "mvn-kafka.log")
        if not any((tmp / "libs").glob("kafka_2.13-*.jar")):
            raise ServiceError("maven finished but no kafka_2.13 jar was copied")

    return _cached(f"kafka-{_kafka_version()}", stamp, fill) / "libs"


def extract(archive: Path, into: Path) -> None:
    """Unpack a tar archive under `into`, refusing members that would land outside it or
    are links. `filter="data"` does that from Python 3.11.4; Debian 12's python3 is 3.11.2,
    where the argument raised TypeError at the first registry download (review "py312")."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
            return
        root = into.resolve()
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if (member.issym() or member.islnk() or member.isdev()
                    or (target != root and root not in target.parents)):
                raise ServiceError(f"{archive.name}: refusing the member {member.name!r}")
        tar.extractall(into)  # every member checked above


def registry_jar() -> Path:
    """The Apicurio Registry runner jar (Quarkus legacy-jar layout), downloaded on first use."""

    def fill(tmp: Path) -> None:
        _mvn(["dependency:copy", f"-Dartifact={REGISTRY_ARTIFACT}", f"-DoutputDirectory={tmp}"],
             cwd=tmp, log_file=CACHE_DIR / "mvn-registry.log")
        archives = list(tmp.glob("*.tar.gz"))
        if len(archives) != 1:
            raise ServiceError(f"expected one registry archive in {tmp}, found {archives}")
        extract(archives[0], tmp)
        archives[0].unlink()

    home = _cached(f"apicurio-registry-{REGISTRY_VERSION}", REGISTRY_ARTIFACT, fill)
    jars = list(home.glob("*-runner.jar")) or list(home.glob("quarkus-run.jar"))
    if not jars:
        raise ServiceError(f"no runnable jar in {home}; delete it to force a fresh download")
    return jars[0]


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Service:
    """Where one service keeps its state and how to tell that it is up."""

    name: str

    @property
    def dir(self) -> Path:
        return RUN_DIR / self.name

    @property
    def pid_file(self) -> Path:
        return RUN_DIR / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        """Kafka logs through log4j2 to its own file; Quarkus logs to the console file."""
        if self.name == "redis":
            return self.dir / "redis.log"
        return self.dir / "kafka.log" if self.name == "kafka" else self.console_file

    @property
    def console_file(self) -> Path:
        return self.dir / "console.log"

    @property
    def marker(self) -> str:
        """A JVM flag that tells our process apart from a stranger that reused the pid."""
        if self.name == "redis":  # redis-server keeps its argv: its config file is the mark
            return str(self.dir / "redis.conf")
        return f"-Duserpilot.service={self.name}@{RUN_DIR}"

    def wanted_port(self) -> int:
        if self.name == "redis":
            return redis_port()
        return kafka_port() if self.name == "kafka" else registry_port()

    def ports(self) -> list[int]:
        if self.name == "redis":
            return [redis_port()]
        return [kafka_port(), controller_port()] if self.name == "kafka" else [registry_port()]

    def address(self, port: int | None = None) -> str:
        if self.name == "redis":
            return redis_url(port)
        return bootstrap_servers(port) if self.name == "kafka" else registry_url(port)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that already exited
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def running(svc: Service) -> tuple[int, int] | None:
    """``(pid, port)`` from the pid file if that process is alive and really is our service."""
    try:
        fields = [int(field) for field in svc.pid_file.read_text().split()]
    except (OSError, ValueError):
        return None
    if not fields:
        return None
    pid = fields[0]
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if svc.marker.encode() not in cmdline:
        return None
    return pid, fields[1] if len(fields) > 1 else _legacy_port(svc, cmdline)


def _legacy_port(svc: Service, cmdline: list[bytes]) -> int:
    """The port of a service started before pid files recorded it (read from its own config)."""
    if svc.name == "redis":
        return redis_port()
    if svc.name == "registry":
        flag = b"-Dquarkus.http.port="
        return next((int(a[len(flag):]) for a in cmdline if a.startswith(flag)), 0)
    with contextlib.suppress(OSError, ValueError):
        for line in (svc.dir / "server.properties").read_text().splitlines():
            if line.startswith("advertised.listeners="):
                return int(line.rsplit(":", 1)[1])
    return 0


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _kafka_api_versions(port: int) -> bool:
    """Send an ApiVersions v0 request: proves the broker speaks Kafka, not just that it listens."""
    client_id = b"userpilot-services"
    body = struct.pack(">hhih", 18, 0, 4242, len(client_id)) + client_id
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:
                chunk = s.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    _size, correlation, error = struct.unpack(">iih", head)
    return bool(correlation == 4242 and error == 0)


def _kafka_metadata(port: int) -> bool:
    """With the venv's confluent_kafka available, also ask for cluster metadata."""
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:
        return True
    try:
        md = AdminClient({"bootstrap.servers": bootstrap_servers(port),
                          "log_level": 0}).list_topics(timeout=5)
    except Exception:
        return False
    return bool(md.brokers)


def kafka_ready(svc: Service, port: int) -> bool:
    if not _kafka_api_versions(port):
        return False
    try:
        started = "Kafka Server started" in svc.log_file.read_text(errors="replace")
    except OSError:
        started = False
    return started and _kafka_metadata(port)


def registry_ready(_svc: Service, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{registry_url(port)}/subjects", timeout=3) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def redis_ready(_svc: Service, port: int) -> bool:
    """PING over RESP: proves Redis answers, not just that something listens."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


READY: dict[str, Callable[[Service, int], bool]] = {
    "kafka": kafka_ready, "registry": registry_ready, "redis": redis_ready,
}


def _random_cluster_id() -> str:
    """Kafka's Uuid.randomUuid(): url-safe base64 of 16 random bytes, never starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java(opts_env: str, heap: str) -> list[str]:
    return [_require_tool("java"), f"-Xmx{heap}", "-Xms64m", "-Djava.awt.headless=true",
            *os.environ.get(opts_env, "").split()]


def _kafka_command(svc: Service) -> list[str]:
    libs = kafka_libs()
    data = svc.dir / "data"
    props = svc.dir / "server.properties"
    props.write_text("\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"listeners=PLAINTEXT://{HOST}:{kafka_port()},CONTROLLER://{HOST}:{controller_port()}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{kafka_port()}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        f"controller.quorum.bootstrap.servers={HOST}:{controller_port()}",
        f"log.dirs={data}",
        "num.partitions=1",
        "auto.create.topics.enable=true",
        "delete.topic.enable=true",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=10",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=10",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "controlled.shutdown.enable=true",
        "controlled.shutdown.max.retries=1",
        "log.flush.scheduler.interval.ms=60000",
        "",
    ]))
    (svc.dir / "log4j2.properties").write_text("\n".join([
        "status = warn",
        "appender.file.type = File",
        "appender.file.name = FILE",
        f"appender.file.fileName = {svc.log_file}",
        "appender.file.layout.type = PatternLayout",
        "appender.file.layout.pattern = [%d] %p %m (%c)%n",
        "rootLogger.level = INFO",
        "rootLogger.appenderRef.file.ref = FILE",
        "logger.raft.name = org.apache.kafka.raft",
        "logger.raft.level = WARN",
        "",
    ]))
    java = [*_java("KAFKA_JAVA_OPTS", "512m"),
            f"-Dlog4j2.configurationFile={svc.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={svc.dir}", "-cp", f"{libs}/*"]
    if (data / "meta.properties").is_file():  # `up --keep-data`: the same cluster again
        return [*java, svc.marker, "kafka.Kafka", str(props)]
    fmt = [*java, "kafka.tools.StorageTool", "format", "--standalone",
           "-t", _random_cluster_id(), "-c", str(props)]
    with svc.console_file.open("w") as out:
        rc = subprocess.call(fmt, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise ServiceError(f"formatting Kafka storage failed ({rc}); see {svc.console_file}")
    return [*java, svc.marker, "kafka.Kafka", str(props)]


def _registry_command(svc: Service) -> list[str]:
    jar = registry_jar()
    return [*_java("REGISTRY_JAVA_OPTS", "384m"), "-XX:+UseSerialGC", svc.marker,
            f"-Dquarkus.http.host={HOST}", f"-Dquarkus.http.port={registry_port()}",
            "-Dquarkus.banner.enabled=false",
            "-Dquarkus.log.console.color=false",
            "-Dapicurio.rest.deletion.group.enabled=true",
            "-Dapicurio.rest.deletion.artifact.enabled=true",
            "-Dapicurio.rest.deletion.artifact-version.enabled=true",
            "-jar", str(jar)]


def _redis_command(svc: Service) -> list[str]:
    """A throw-away Redis: no persistence (tests want a fresh store every start)."""
    server = shutil.which("redis-server")
    if not server:
        raise ServiceError("'redis-server' is not on PATH; install Debian's redis-server "
                           "(`make sysdeps` does it as root)")
    conf = Path(svc.marker)
    conf.write_text("\n".join([
        f"bind {HOST}",
        f"port {redis_port()}",
        "protected-mode yes",
        "daemonize no",
        "set-proc-title no",  # keep argv, so `running` recognises the config file
        f"dir {svc.dir}",
        f"logfile {svc.log_file}",
        'save ""',
        "appendonly no",
        "maxmemory-policy noeviction",
        "",
    ]))
    return [server, str(conf)]


COMMANDS: dict[str, Callable[[Service], list[str]]] = {
    "kafka": _kafka_command, "registry": _registry_command, "redis": _redis_command,
}


def _wait_ready(
    svc: Service, pid: int, port: int, proc: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + start_timeout()
    hint = f"{svc.log_file}" if svc.log_file == svc.console_file else (
        f"{svc.log_file} and {svc.console_file}")
    while time.monotonic() < deadline:
        if READY[svc.name](svc, port):
            return
        exited = proc.poll() is not None if proc is not None else not _alive(pid)
        if exited:
            raise ServiceError(f"{svc.name} exited during start-up; see {hint}")
        time.sleep(0.5)
    raise ServiceError(f"{svc.name} (pid {pid}) not ready after {start_timeout():.0f}s; "
                       f"see {hint}")


def up_one(name: str, keep_data: bool = False) -> bool:
    """Make ``name`` run and be ready. Returns True if this call started it (False: reused).

    ``keep_data`` starts on the state left by the last run (Kafka: same cluster, topics,
    offsets) instead of a fresh one.
    """
    svc = Service(name)
    var = {"kafka": "KAFKA_PORT", "redis": "REDIS_PORT"}.get(name, "REGISTRY_PORT")
    found = running(svc)
    if found is not None:
        pid, port = found
        if port != svc.wanted_port():
            raise ServiceError(f"{name} already runs from this checkout on port {port} "
                               f"(pid {pid}); use {var}={port} or run `down {name}` first")
        _wait_ready(svc, pid, port, None)
        log(f"{name}: already running (pid {pid}) at {svc.address(port)}, reusing")
        return False
    busy = [p for p in svc.ports() if _port_open(p)]
    if busy:
        raise ServiceError(f"{name}: port(s) {busy} on {HOST} are taken by another process; "
                           f"stop it or choose another {var}")
    started = time.monotonic()
    if keep_data and svc.dir.is_dir():
        if svc.log_file.is_file():  # readiness reads the log: start it afresh
            svc.log_file.replace(svc.log_file.with_name(svc.log_file.name + ".1"))
    else:
        shutil.rmtree(svc.dir, ignore_errors=True)  # a fresh cluster / registry every start
        svc.dir.mkdir(parents=True)
    cmd = COMMANDS[name](svc)
    with svc.console_file.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=svc.dir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    svc.pid_file.write_text(f"{proc.pid} {svc.wanted_port()}\n")
    (RUN_DIR / f"{svc.name}.port").write_text(f"{svc.wanted_port()}\n")  # kept after down
    try:
        _wait_ready(svc, proc.pid, svc.wanted_port(), proc)
    except ServiceError:
        _stop(svc, proc.pid)
        raise
    log(f"{name}: started (pid {proc.pid}) at {svc.address()} "
        f"in {time.monotonic() - started:.1f}s")
    return True


def _stop(svc: Service, pid: int, grace: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)  # a frozen service acts on the SIGTERM only when thawed
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        log(f"{svc.name}: still running after {grace:.0f}s, sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    svc.pid_file.unlink(missing_ok=True)


def down_one(name: str) -> None:
    svc = Service(name)
    found = running(svc)
    if found is None:
        svc.pid_file.unlink(missing_ok=True)
        log(f"{name}: not running")
        return
    pid = found[0]
    _stop(svc, pid)
    log(f"{name}: stopped (pid {pid})")


SIGNALS = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "thaw": signal.SIGCONT}


def _frozen(pid: int) -> bool:
    """Stopped by SIGSTOP (`freeze`): probing it would only wait for timeouts."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def signal_one(name: str, action: str) -> None:
    """SIGKILL (a crash), SIGSTOP (hung) or SIGCONT a running service of this checkout."""
    svc = Service(name)
    found = running(svc)
    if found is None:
        raise ServiceError(f"{name} is not running from this checkout (port "
                           f"{svc.wanted_port()})")
    pid = found[0]
    os.killpg(pid, SIGNALS[action])
    if action == "kill":
        while _alive(pid):
            time.sleep(0.1)
        svc.pid_file.unlink(missing_ok=True)
    log(f"{name}: {action} (pid {pid})")


# --------------------------------------------------------------------------- command line


def _names(which: str) -> list[str]:
    return list(ALL) if which == "all" else [which]


def cmd_up(args: argparse.Namespace) -> int:
    record: Path | None = args.record
    with _flock(RUN_DIR / ".lock"):
        for name in _names(args.which):
            if up_one(name, keep_data=args.keep_data) and record is not None:
                with record.open("a") as fh:
                    fh.write(name + "\n")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    names = _names(args.which)
    if args.from_file is not None:
        path: Path = args.from_file
        listed = path.read_text().split() if path.exists() else []
        names = [n for n in ALL if n in listed]
        path.unlink(missing_ok=True)
    with _flock(RUN_DIR / ".lock"):
        for name in reversed(names):
            down_one(name)
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    with _flock(RUN_DIR / ".lock"):
        signal_one(args.which, args.command)
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    all_up = True
    for name in ALL:
        svc = Service(name)
        found = running(svc)
        if found is None:
            all_up = False
            print(f"{name}: stopped (would use {svc.address()})")
        else:
            pid, port = found
            ready = "FROZEN (thaw it)" if _frozen(pid) else (
                "ready" if READY[name](svc, port) else "NOT ready")
            print(f"{name}: running pid {pid}, {ready} at {svc.address(port)}, "
                  f"log {svc.log_file}")
    return 0 if all_up else 3


def cmd_env(args: argparse.Namespace) -> int:
    """Addresses of the running services (else of those `up` would start)."""
    prefix = "export " if args.export else ""
    for name, var in (("kafka", "KAFKA_BOOTSTRAP_SERVERS"), ("registry", "SCHEMA_REGISTRY_URL"),
                      ("redis", "REDIS_URL")):
        svc = Service(name)
        found = running(svc)
        print(f"{prefix}{var}={svc.address(found[1] if found else None)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start (or reuse) services and wait until ready")
    up.add_argument("which", nargs="?", default="all", choices=[*ALL, "all"])
    up.add_argument("--record", type=Path, help="append the names this call started to FILE")
    up.add_argument("--keep-data", action="store_true",
                    help="start on the data of the last run (restart a stopped broker)")
    down = sub.add_parser("down", help="stop services (safe when nothing runs)")
    down.add_argument("which", nargs="?", default="all", choices=[*ALL, "all"])
    down.add_argument("--from", dest="from_file", type=Path,
                      help="stop only the services listed in FILE (from `up --record`)")
    for action, text in (("kill", "SIGKILL a service (a crash; its data stays)"),
                         ("freeze", "SIGSTOP a service (it hangs)"),
                         ("thaw", "SIGCONT a frozen service")):
        sig = sub.add_parser(action, help=text)
        sig.add_argument("which", choices=ALL)
    sub.add_parser("status", help="show what runs; exit 3 unless everything runs")
    env = sub.add_parser("env", help="print KAFKA_BOOTSTRAP_SERVERS=, SCHEMA_REGISTRY_URL= "
                                     "and REDIS_URL=")
    env.add_argument("--export", action="store_true", help="prefix lines with 'export '")
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env,
        "kill": cmd_signal, "freeze": cmd_signal, "thaw": cmd_signal,
    }
    try:
        return handlers[args.command](args)
    except ServiceError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
