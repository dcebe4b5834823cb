"""NATS authentication and TLS on the node's real nats-server: a terminal credential can
publish only to its own terminals' subjects; no credential, or no TLS, no connection."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import SettingsError
from appliance.nats_auth import client_options, load_auth
from appliance.operations.node import EmbeddedNats
from appliance.scoring.streams import ensure_streams
from appliance.settings import Settings, load
from appliance.transaction import encode

from .support import HISTORY, make_transactions, stored_count, wait_until


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 (it is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "branchguard-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


AUTH = """
[node]
user = "node"
password = "node-secret"

[terminal_groups.atm-north]
password = "north-secret"
terminals = ["T0001", "T0002"]

[terminal_groups.atm-south]
password = "south-secret"
terminals = ["T0003"]
"""


@pytest.fixture
def secure(tmp_path: Path) -> Settings:
    cert, key = _certificate(tmp_path)
    auth = tmp_path / "nats-auth.toml"
    auth.write_text(AUTH)
    return load(None, env={}, data_dir=tmp_path / "node", nats_port=0, nats_auth_file=auth,
                nats_tls_cert=cert, nats_tls_key=key, nats_tls_ca=cert)


def _tls(settings: Settings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(settings.nats_tls_ca))


async def _connect_once(url: str, **options: object) -> NATS:
    """One connection attempt, and no connection left behind when it fails.

    With ``allow_reconnect=False`` nats-py raises the first failure *without closing the
    transport it opened* (``Client.connect``: "Bail on first attempt"). If the server's
    close is not processed before the test's event loop ends, that transport (TLS, or the
    plain socket under a failed TLS upgrade) is only collected later, during some other
    test, as an "unclosed transport" ResourceWarning: the rare setup error of
    test_the_node_scores_over_auth_and_tls, which runs next. So the client is made first
    and closed whatever happens; after a failed TLS upgrade its close closes the socket and
    then waits for a close that never comes, hence the bound.
    """
    nc = NATS()
    try:
        await nc.connect(url, max_reconnect_attempts=0, allow_reconnect=False, **options)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)
        raise
    return nc


async def _publish(url: str, settings: Settings, user: str, password: str, subject: str
                   ) -> tuple[bool, list[str]]:
    """Publish one transaction as ``user`` through JetStream; (acked, errors seen)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, user=user, password=password, tls=_tls(settings),
                            error_cb=on_error, max_reconnect_attempts=0)
    try:
        _, _, terminal, account = subject.split(".")
        tx = msgspec.structs.replace(make_transactions(1, seed=3)[0].tx, terminal_id=terminal,
                                     account_id=account)
        try:
            await nc.jetstream().publish(subject, encode(tx), timeout=1.5,
                                         headers={"Nats-Msg-Id": subject})
            return True, errors
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
            return False, errors
    finally:
        await nc.close()


def test_a_terminal_publishes_only_to_its_own_subjects(secure: Settings) -> None:
    with EmbeddedNats(secure) as server:
        url = server.url

        async def go() -> None:
            node = await nats.connect(url, **client_options(secure))
            await ensure_streams(node.jetstream(), secure)
            ok, _ = await _publish(url, secure, "atm-north", "north-secret", "tx.BR001.T0002.A1")
            assert ok
            ok, errors = await _publish(url, secure, "atm-north", "north-secret",
                                        "tx.BR001.T0003.A1")  # atm-south's terminal
            assert not ok and any("permissions violation" in e.lower() for e in errors), errors
            ok, errors = await _publish(url, secure, "atm-south", "south-secret",
                                        "tx.BR002.T0003.A1")  # another branch
            assert not ok
            info = await node.jetstream().stream_info("TX", subjects_filter=">")
            assert info.state.subjects == {"tx.BR001.T0002.A1": 1}
            # Verdicts: its own terminals' only.
            errors.clear()
            north = await nats.connect(url, user="atm-north", password="north-secret",
                                       tls=_tls(secure), error_cb=_collect(errors))
            await north.subscribe("verdict.BR001.T0003")
            await north.flush()
            await asyncio.sleep(0.2)
            assert any("permissions violation" in e.lower() for e in errors), errors
            await north.close()
            await node.close()

        asyncio.run(go())


def _collect(errors: list[str]):  # type: ignore[no-untyped-def]
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
    return on_error


def test_no_credential_or_no_tls_means_no_connection(secure: Settings) -> None:
    with EmbeddedNats(secure) as server:
        async def attempt(**options: object) -> str:
            try:
                nc = await _connect_once(server.url, connect_timeout=2, **options)
            except Exception as exc:  # noqa: BLE001 - any refusal will do; which one is shown
                return type(exc).__name__ + str(exc)
            await nc.close()
            return "connected"

        assert asyncio.run(attempt(tls=_tls(secure))) != "connected"  # no user
        assert asyncio.run(attempt(tls=_tls(secure), user="atm-north",
                                   password="wrong")) != "connected"
        assert asyncio.run(attempt(user="node", password="node-secret")) != "connected"  # no TLS
        assert asyncio.run(attempt(tls=_tls(secure), **{"user": "node",
                                                        "password": "node-secret"})) == "connected"


def test_the_node_scores_over_auth_and_tls(secure: Settings, tmp_path: Path) -> None:
    """``branchguard run`` with its embedded nats-server, authenticated and over TLS."""
    env = {**os.environ, **HISTORY, "BRANCHGUARD_NATS_PORT": "0",
           "BRANCHGUARD_REPLICATE": "false",
           "BRANCHGUARD_NATS_AUTH_FILE": str(secure.nats_auth_file),
           "BRANCHGUARD_NATS_TLS_CERT": str(secure.nats_tls_cert),
           "BRANCHGUARD_NATS_TLS_KEY": str(secure.nats_tls_key),
           "BRANCHGUARD_NATS_TLS_CA": str(secure.nats_tls_ca)}
    data = tmp_path / "run"
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        node = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--quiet",
                                 "--data-dir", str(data)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        wait_until(lambda: '"node.ready"' in log.read_text(), message=log.read_text())
        assert "node-secret" not in log.read_text()
        ports = next((data / "nats" / "ports").glob("*.ports")).read_text()
        url = json.loads(ports)["nats"][0]
        ok, errors = asyncio.run(_publish(url, secure, "atm-north", "north-secret",
                                          "tx.BR001.T0001.A9"))
        assert ok, errors
        wait_until(lambda: stored_count(data / "branchguard.db") == 1, message="scored")
    finally:
        node.terminate()
        node.wait(30)
    assert node.returncode == 0, log.read_text()
    assert "node-secret" not in (data / "nats" / "nats-server.log").read_text()
    assert oct((data / "nats" / "nats-server.conf").stat().st_mode & 0o777) == "0o600"


def test_auth_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "auth.toml"
    bad.write_text('[node]\nuser = "node"\npassword = "x"\n[terminal_groups.g]\n'
                   'password = "y"\nterminals = []\n')
    with pytest.raises(SettingsError, match="terminal_groups.g.terminals"):
        load_auth(bad)
    with pytest.raises(SettingsError, match="^nats_host: invalid value"):
        load(None, env={}, nats_host="0.0.0.0")


def test_nats_server_command_serves_the_node_configuration(secure: Settings) -> None:
    """``branchguard nats-server`` (the systemd unit) runs nats-server with the same auth and
    TLS as the embedded node: a terminal may publish its own subject, no one gets in bare."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BRANCHGUARD_NATS_PORT": str(port),
           "BRANCHGUARD_NATS_AUTH_FILE": str(secure.nats_auth_file),
           "BRANCHGUARD_NATS_TLS_CERT": str(secure.nats_tls_cert),
           "BRANCHGUARD_NATS_TLS_KEY": str(secure.nats_tls_key)}
    process = subprocess.Popen([sys.executable, "-m", "appliance", "nats-server",
                                "--data-dir", str(secure.data_dir)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    try:
        async def go() -> None:
            for _ in range(100):
                try:
                    node = await _connect_once(url, **client_options(secure))
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("nats-server did not come up")
            await ensure_streams(node.jetstream(), secure)
            await node.close()
            ok, _ = await _publish(url, secure, "atm-south", "south-secret", "tx.BR001.T0003.A2")
            assert ok
            ok, _ = await _publish(url, secure, "atm-south", "south-secret", "tx.BR001.T0001.A2")
            assert not ok

        asyncio.run(go())
    finally:
        process.terminate()
        process.wait(10)
    assert oct((secure.data_dir / "nats" / "nats-server.conf").stat().st_mode & 0o777) == "0o600"
