"""`zk0 certs` output is what Flower 1.41 loads: a CA-signed server cert with SANs, OpenSSH EC node keys."""

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from zk0.cli import main
from zk0.server.certs import CertPaths


def test_certs_command_makes_a_verifiable_chain_and_node_keys(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--host", "fl.example.org", "--host", "10.1.2.3",
                 "--node", "arm-1"]) == 0
    paths = CertPaths(tmp_path)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    private = serialization.load_ssh_private_key(paths.node_private_key("arm-1").read_bytes(), None)
    public = serialization.load_ssh_public_key(paths.node_public_key("arm-1").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()
    for secret in (paths.ca_key, paths.server_key, paths.node_private_key("arm-1")):
        assert secret.stat().st_mode & 0o777 == 0o600
    assert "arm-1" in capsys.readouterr().out


def test_existing_ca_is_kept_unless_forced(tmp_path):
    assert main(["certs", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(tmp_path), "--node", "n2"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == first
    assert main(["certs", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() != first


def test_bad_node_name_is_one_line(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--node", "../x"]) == 2
    assert capsys.readouterr().out.strip().startswith("zk0 certs: invalid node name")
