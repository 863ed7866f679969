"""TLS to the coordinator: the mock behind https with a throwaway CA made here.

A miner pinning that CA registers and runs a job; one pinning another CA (or using
the default trust store) never registers and says why in its log; plain http:// to
a non-loopback host is refused when the config is loaded.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.security._e2e import marker_job, markers, wait_final
from tests.support.minerproc import DEV_CONFIG, REPO
from tests.support.mockproc import MockCoordinator, start_mock


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True,
    crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


def make_ca(directory: Path, cn: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(
    directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mock-coordinator"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    ca, ca_cert, ca_key = make_ca(d, "aitbc-test-ca")
    other, _, _ = make_ca(d, "some-other-ca")
    cert, key = make_server_cert(d, ca_cert, ca_key)
    return {"ca": ca, "other_ca": other, "cert": cert, "key": key}


@pytest.fixture
def tls_mock(tmp_path: Path, pki: dict[str, Path]):
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    mock = start_mock(
        tmp_path / "mock", "--certfile", str(pki["cert"]), "--keyfile", str(pki["key"]),
        verify=context,
    )  # fmt: skip
    try:
        yield mock
    finally:
        mock.stop()


def test_mock_serves_https_only_to_clients_trusting_its_ca(tls_mock: MockCoordinator):
    assert tls_mock.url.startswith("https://127.0.0.1:")
    assert tls_mock.admin.stats()["nodes"] == 0  # the admin client trusts the test CA


def test_pinned_ca_registers_and_runs_a_job(tls_mock, pki, miner_factory):
    miner = miner_factory(tls_mock, AITBC_MINER_COORDINATOR__TLS_VERIFY=str(pki["ca"]))
    tls_mock.admin.enqueue(marker_job("tls-1"), retry=False)
    assert wait_final(tls_mock, "tls-1")["state"] == "succeeded"
    assert [p.name for p in markers(miner.workspace)] == ["ran-tls-1"]
    assert tls_mock.admin.node(miner.node_id)["registrations"] == 1


@pytest.mark.parametrize("trust", ["other_ca", "default"])
def test_untrusted_certificate_never_registers(tls_mock, pki, miner_factory, trust):
    overrides = {"AITBC_MINER_COORDINATOR__TLS_VERIFY": str(pki["other_ca"])}
    if trust == "default":
        overrides = {"AITBC_MINER_COORDINATOR__TLS_VERIFY": "true"}
    miner = miner_factory(tls_mock, wait_registered=False, **overrides)
    retry = miner.wait_event("coordinator_retry", endpoint="nodes/register")
    assert "CERTIFICATE_VERIFY_FAILED" in retry["reason"], retry
    # A few more attempts, none of which gets through.
    miner.wait_event("coordinator_retry", endpoint="nodes/register", attempt=3)
    assert miner.find("registered") == []
    assert tls_mock.admin.nodes() == []
    assert miner.proc.poll() is None  # keeps trying: the operator may fix the CA


NON_LOOPBACK_HTTP = [
    "http://coordinator.example/api/v1",
    "http://10.1.2.3:8080/api/v1",
    "http://localhost.example.com/api/v1",
    "http://127.0.0.1.nip.io/api/v1",
]


def miner_cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aitbc_miner", command, "--config", str(DEV_CONFIG)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_plain_http_to_a_non_loopback_host_is_refused_at_config_load(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
    env.update(
        MINER_AUTH="t0ken-for-config-check",
        AITBC_MINER_NODE_ID="node-cfg",
        AITBC_MINER_WORKSPACE__ROOT=str(tmp_path / "ws"),
    )
    runs = [("check-config", url) for url in NON_LOOPBACK_HTTP] + [("run", NON_LOOPBACK_HTTP[0])]
    for command, url in runs:
        done = miner_cli(command, {**env, "AITBC_MINER_COORDINATOR__BASE_URL": url})
        assert done.returncode == 2, (command, url, done.stdout, done.stderr)
        assert "coordinator.base_url" in done.stderr and "http://" in done.stderr, done.stderr
        assert "t0ken-for-config-check" not in done.stdout + done.stderr
    assert not (tmp_path / "ws").exists()  # `run` stopped before touching anything
    allowed = {**env, "AITBC_MINER_COORDINATOR__BASE_URL": NON_LOOPBACK_HTTP[0],
               "AITBC_MINER_COORDINATOR__ALLOW_INSECURE_HTTP": "true"}  # fmt: skip
    done = miner_cli("check-config", allowed)
    assert done.returncode == 0, done.stderr
