"""TLS and mutual TLS: certificates made in the test, `shardwright serve` subprocesses that use them."""

from __future__ import annotations

import datetime
import ipaddress
import os

import grpc
import pytest

from shardwright.api.client import Client, ShardwrightError

x509 = pytest.importorskip("cryptography.x509", reason="cryptography makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from test_server_e2e import start_server, stop_server  # noqa: E402


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert, key) -> tuple:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shardwright-test-ca")])
    ca = _cert("shardwright-test-ca", ca_key, ca_name, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = _cert("localhost", ca_key, ca_name, server_key, ca=False, sans=sans)
    client = _cert("alice", ca_key, ca_name, client_key, ca=False)
    ca_path, _ = _write(tmp_path / "ca", ca, ca_key)
    return ca_path, _write(tmp_path / "server", server, server_key), _write(tmp_path / "client", client, client_key)


def test_mutual_tls_accepts_certified_clients_and_refuses_others(tmp_path, monkeypatch):
    ca, (server_cert, server_key), (client_cert, client_key) = make_pki(tmp_path)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("alice-token-123: alice\n")
    monkeypatch.setitem(os.environ, "SHARDWRIGHT_TLS_CERT", str(server_cert))
    monkeypatch.setitem(os.environ, "SHARDWRIGHT_TLS_KEY", str(server_key))
    monkeypatch.setitem(os.environ, "SHARDWRIGHT_TLS_CLIENT_CA", str(ca))
    proc, address = start_server(tmp_path / "state", tokens)
    try:
        with Client(address, token="alice-token-123", ca_cert=ca, client_cert=client_cert, client_key=client_key) as ok:
            assert ok.health() == "SERVING"
            assert ok.list()[0] == []
        with Client(address, token="alice-token-123", ca_cert=ca) as no_client_cert:
            with pytest.raises(ShardwrightError) as err:
                no_client_cert.list()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE  # the handshake is refused
        with Client(address, token="alice-token-123") as plaintext:
            with pytest.raises(ShardwrightError) as err:
                plaintext.list()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_server(proc)


def test_server_tls_without_client_certificates(tmp_path, monkeypatch):
    """TLS with a server certificate only: clients that trust the CA get in with a token alone;
    plaintext clients and clients that do not trust the certificate are refused."""
    ca, (server_cert, server_key), _ = make_pki(tmp_path)
    (tmp_path / "other").mkdir()
    make_pki(tmp_path / "other")  # a second, unrelated CA that the last client trusts instead
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("alice-token-123: alice\n")
    monkeypatch.setitem(os.environ, "SHARDWRIGHT_TLS_CERT", str(server_cert))
    monkeypatch.setitem(os.environ, "SHARDWRIGHT_TLS_KEY", str(server_key))
    monkeypatch.delitem(os.environ, "SHARDWRIGHT_TLS_CLIENT_CA", raising=False)
    proc, address = start_server(tmp_path / "state", tokens)
    try:
        with Client(address, token="alice-token-123", ca_cert=ca) as ok:
            assert ok.health() == "SERVING"
            assert ok.list()[0] == []
        with Client(address, ca_cert=ca) as no_token:  # TLS does not replace the token
            with pytest.raises(ShardwrightError) as err:
                no_token.list()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        for refused in (Client(address, token="alice-token-123"),
                        Client(address, token="alice-token-123", ca_cert=tmp_path / "other" / "ca.crt")):
            with refused, pytest.raises(ShardwrightError) as err:
                refused.list()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_server(proc)


# ---- tokens never travel in cleartext beyond loopback unless asked (issue 16, point 4)

def test_serve_beyond_loopback_with_tokens_and_no_tls_refuses_before_starting_anything(tmp_path):
    """One line naming --insecure and the TLS variables, exit 2, and before Ray is joined (a Ray
    address that does not exist would fail differently if it got that far)."""
    import subprocess
    import sys

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("alice-token-123: alice\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDWRIGHT_TLS")}
    env.update(SHARDWRIGHT_TOKENS_FILE=str(tokens), SHARDWRIGHT_STATE_DIR=str(tmp_path / "state"),
               SHARDWRIGHT_RAY_ADDRESS="127.0.0.1:1")
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        out = subprocess.run([sys.executable, "-m", "shardwright.api.cli", "serve", "--host", host, "--port", "0"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "--insecure" in lines[0] and "SHARDWRIGHT_TLS_CERT" in lines[0] and "SHARDWRIGHT_TLS_KEY" in lines[0]


def test_check_listen_matrix(caplog):
    from shardwright.api.server import check_listen

    check_listen("127.0.0.1", authenticated=False)
    check_listen("::1", authenticated=True)
    check_listen("0.0.0.0", authenticated=True, tls=True)
    with pytest.raises(ValueError, match="without authentication"):
        check_listen("0.0.0.0", authenticated=False, insecure=True)  # --insecure is about TLS, not tokens
    with pytest.raises(ValueError, match="--insecure"):
        check_listen("0.0.0.0", authenticated=True)
    with caplog.at_level("WARNING"):
        check_listen("0.0.0.0", authenticated=True, insecure=True)
    assert "--insecure" in caplog.text and "plaintext" in caplog.text


def test_serve_insecure_listens_beyond_loopback_with_a_warning(tmp_path):
    from test_server_e2e import start_server_info

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("alice-token-123: alice\n")
    proc, info = start_server_info(tmp_path / "state", tokens, "--host", "0.0.0.0", "--insecure")
    try:
        port = info["address"].rsplit(":", 1)[1]
        with Client(f"127.0.0.1:{port}", token="alice-token-123") as client:
            assert client.list()[0] == []
    finally:
        stop_server(proc)


def test_client_refuses_to_send_a_token_in_cleartext_beyond_loopback(tmp_path):
    import subprocess
    import sys

    for address in ("10.1.2.3:50051", "dns:///example.com:443", "[2001:db8::1]:50051", "example.com:50051"):
        with pytest.raises(ValueError, match="--insecure"):
            Client(address, token="alice-token-123")
        Client(address, token="alice-token-123", insecure=True).close()  # told to: allowed
        Client(address).close()  # no token: nothing to leak
    ca, _, _ = make_pki(tmp_path)
    Client("10.1.2.3:50051", token="alice-token-123", ca_cert=ca).close()  # TLS: allowed
    for address in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/sock"):
        Client(address, token="alice-token-123").close()
    env = {**os.environ, "SHARDWRIGHT_TOKEN": "alice-token-123"}
    out = subprocess.run([sys.executable, "-m", "shardwright.api.cli", "status", "--address", "192.0.2.7:50051"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--insecure" in out.stderr and "--ca-cert" in out.stderr
