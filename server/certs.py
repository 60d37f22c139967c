"""`zk0 certs`: the federation's key material, made with `cryptography`.

One directory holds everything a federation needs:

    ca.crt / ca.key           the federation's certificate authority (keep ca.key offline)
    server.crt / server.key   the SuperLink's TLS certificate, signed by the CA, with the
                              server's host names and addresses as subject alternative names
    nodes/<name>.key          a SuperNode's authentication key (OpenSSH, EC P-384), stays on the host
    nodes/<name>.pub          its public half, registered on the SuperLink (`flwr supernode register`)

Flower 1.41 expects exactly these forms: PEM files for `flower-superlink --ssl-*` and
`flower-supernode --root-certificates`, OpenSSH EC keys on a NIST curve for SuperNode auth.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
CERT_VALIDITY_DAYS = 825  # the longest validity common TLS clients accept for a leaf certificate


@dataclass(frozen=True)
class CertPaths:
    """Where `zk0 certs` puts (and the launchers find) each file."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_private_key(self, node: str) -> Path:
        return self.root / "nodes" / f"{node}.key"

    def node_public_key(self, node: str) -> Path:
        return self.root / "nodes" / f"{node}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_ca(paths: CertPaths, name: str = "zk0 federation CA") -> None:
    """Create a self-signed CA certificate and key."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=10 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(paths.ca_key, _pem_key(key))
    _write_public(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def create_server_cert(paths: CertPaths, hosts: list[str]) -> None:
    """Create the SuperLink certificate for `hosts` (plus loopback, which the server's own `flwr`
    commands use), signed by the CA in `paths`."""
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or address")
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(paths.server_key, _pem_key(key))
    _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def create_node_key(paths: CertPaths, node: str) -> None:
    """Create a SuperNode authentication key pair (OpenSSH, EC P-384) named `node`."""
    if not node or "/" in node or node.startswith("."):
        raise ValueError(f"invalid node name {node!r}: use letters, digits, '-' or '_'")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(paths.node_private_key(node), private)
    _write_public(paths.node_public_key(node), public + f" zk0-node-{node}\n".encode())


def ensure_federation_keys(paths: CertPaths, hosts: list[str], nodes: list[str]) -> None:
    """Create what is missing: CA, server certificate, and one key pair per node name."""
    if not (paths.ca_cert.exists() and paths.ca_key.exists()):
        create_ca(paths)
    if not (paths.server_cert.exists() and paths.server_key.exists()):
        create_server_cert(paths, hosts)
    for node in nodes:
        if not paths.node_private_key(node).exists():
            create_node_key(paths, node)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("certs"), help="directory for keys (default: ./certs)")
    parser.add_argument(
        "--host", action="append", default=None,
        help="SuperLink host name or IP for the server certificate; repeat for several "
        f"(default: {', '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument("--node", action="append", default=[], help="make a SuperNode key pair with this name; repeat")
    parser.add_argument("--force", action="store_true", help="replace existing CA and server certificate")


def run(args: argparse.Namespace) -> int:
    paths = CertPaths(args.out)
    hosts = list(args.host or DEFAULT_HOSTS)
    try:
        if args.force:
            create_ca(paths)
            create_server_cert(paths, hosts)
        ensure_federation_keys(paths, hosts, args.node)
    except ValueError as err:
        print(f"zk0 certs: {err}")
        return 2
    print(f"CA certificate:     {paths.ca_cert}  (give to every node)")
    print(f"server certificate: {paths.server_cert} for {', '.join(hosts)}")
    for node in args.node:
        print(f"node {node}: private key {paths.node_private_key(node)} (copy to that host only), "
              f"public key {paths.node_public_key(node)} (register on the SuperLink)")
    return 0
