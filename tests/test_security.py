"""TLS, mutual TLS and bearer-token roles on a live server; health checks stay open."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cbmir.client import RetrievalClient
from cbmir.errors import InvalidInputError
from cbmir.server.config import ServerConfig
from cbmir.server.security import read_tokens
from cbmir.server.startup import start_server

SEARCH_TOKEN = "search-token-0123456789"
ADMIN_TOKEN = "admin-token-abcdefghijk"


def _cert(subject: str, issuer_key, issuer_name, public_key, *, ca: bool, san: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA with a server certificate (localhost) and a client certificate, as PEM files."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cbmir test CA")])
    ca = _cert("cbmir test CA", ca_key, ca_name, ca_key.public_key(), ca=True, san=False)
    files: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        (out / name).write_bytes(data)
        files[name] = str(out / name)

    write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, ca_key, ca_name, key.public_key(), ca=False, san=who == "server")
        write(f"{who}.pem", cert.public_bytes(serialization.Encoding.PEM))
        write(
            f"{who}.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    write(
        "other-ca.pem",
        _cert("other CA", other_key, other_name, other_key.public_key(), ca=True, san=False).public_bytes(
            serialization.Encoding.PEM
        ),
    )
    tokens = out / "tokens"
    tokens.write_text(f"# role token\nsearch {SEARCH_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    files["tokens"] = str(tokens)
    return files


def _codes(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_tokens_gate_every_method_but_health(small_bundle: Path, pki: dict[str, str]) -> None:
    running = start_server(
        ServerConfig(index=str(small_bundle), port=0, device="cpu", tokens_file=pki["tokens"]), wait_ready=True
    )
    target = f"127.0.0.1:{running.port}"
    try:
        with RetrievalClient(target, timeout=20) as anonymous:
            assert anonymous.health() == "SERVING"
            assert (
                _codes(lambda: anonymous.search_id("images/00000.png", k=3, method="hog"))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert _codes(anonymous.index_info) == grpc.StatusCode.UNAUTHENTICATED
        with RetrievalClient(target, timeout=20, token=SEARCH_TOKEN + "x") as wrong:
            assert _codes(wrong.index_info) == grpc.StatusCode.UNAUTHENTICATED
        with RetrievalClient(target, timeout=20, token=SEARCH_TOKEN) as searcher:
            assert len(searcher.search_id("images/00000.png", k=3, method="hog")) == 3
            assert searcher.index_info().count == 90
            assert _codes(searcher.reload) == grpc.StatusCode.PERMISSION_DENIED
        with RetrievalClient(target, timeout=20, token=ADMIN_TOKEN) as admin:
            assert admin.reload().changed is False
            assert len(admin.search_id("images/00000.png", k=3, method="hog")) == 3
    finally:
        running.stop(0)


def test_tls_and_mutual_tls(small_bundle: Path, pki: dict[str, str]) -> None:
    tls = start_server(
        ServerConfig(
            index=str(small_bundle),
            port=0,
            device="cpu",
            host="localhost",
            tls_cert=pki["server.pem"],
            tls_key=pki["server.key"],
        ),
        wait_ready=True,
    )
    mtls = start_server(
        ServerConfig(
            index=str(small_bundle),
            port=0,
            device="cpu",
            host="localhost",
            tls_cert=pki["server.pem"],
            tls_key=pki["server.key"],
            tls_client_ca=pki["ca.pem"],
        ),
        wait_ready=True,
    )
    try:
        with RetrievalClient(f"localhost:{tls.port}", timeout=10, tls_ca=pki["ca.pem"]) as c:
            assert len(c.search_id("images/00000.png", k=2, method="hog")) == 2
        with RetrievalClient(f"localhost:{tls.port}", timeout=5) as plaintext:
            assert _codes(plaintext.index_info) == grpc.StatusCode.UNAVAILABLE
        with RetrievalClient(f"localhost:{tls.port}", timeout=5, tls_ca=pki["other-ca.pem"]) as untrusting:
            assert _codes(untrusting.index_info) == grpc.StatusCode.UNAVAILABLE
        with RetrievalClient(f"localhost:{mtls.port}", timeout=5, tls_ca=pki["ca.pem"]) as no_cert:
            assert _codes(no_cert.index_info) == grpc.StatusCode.UNAVAILABLE
        with RetrievalClient(
            f"localhost:{mtls.port}",
            timeout=10,
            tls_ca=pki["ca.pem"],
            tls_cert=pki["client.pem"],
            tls_key=pki["client.key"],
        ) as c:
            assert c.index_info().count == 90 and c.health() == "SERVING"
    finally:
        tls.stop(0)
        mtls.stop(0)


def test_bad_security_configuration_is_refused(small_bundle: Path, tmp_path: Path, pki: dict[str, str]) -> None:
    short = tmp_path / "short"
    short.write_text("admin abc\n")
    with pytest.raises(InvalidInputError, match="at least 16"):
        read_tokens(short)
    role = tmp_path / "role"
    role.write_text("root 0123456789abcdefgh\n")
    with pytest.raises(InvalidInputError, match="role:1"):
        read_tokens(role)
    with pytest.raises(InvalidInputError, match="both"):
        start_server(ServerConfig(index=str(small_bundle), port=0, tls_cert=pki["server.pem"]))


def test_tokens_file_keeps_a_hash_inside_a_token_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text("# comment line\n  # indented comment\nadmin abc#defghijklmnopqrstu\n\nsearch 0123456789abcdef\n")
    assert read_tokens(good) == [(b"abc#defghijklmnopqrstu", "admin"), (b"0123456789abcdef", "search")]
    secret = "s3cret-token-value-xyz"
    for line, problem in (
        (f"admin {secret} extra", "expected 'ROLE TOKEN'"),
        (f"root {secret}", "ROLE one of"),
        ("search short", "at least 16 characters"),
    ):
        bad = tmp_path / "bad"
        bad.write_text(f"# ok\n{line}\n")
        with pytest.raises(InvalidInputError, match=problem) as err:
            read_tokens(bad)
        assert f"{bad}:2:" in str(err.value) and secret not in str(err.value) and "short" not in str(err.value)
