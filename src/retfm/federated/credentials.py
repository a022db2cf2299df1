"""Certificates and keys of a deployed federation (``retfm federated certs``), made with ``cryptography``.

A private certificate authority signs the SuperLink's TLS certificate: every SuperNode and the ``flwr`` CLI trust
that CA (``--root-certificates`` / ``root-certificates``), so they know they talk to the coordinator's SuperLink and
nobody can read the weights on the way. Each site gets an EC P-384 key pair in OpenSSH format, the kind Flower
1.42's SuperNode authentication takes: the SuperNode signs its requests with the private key
(``--auth-supernode-private-key``), and a SuperLink started with ``--enable-supernode-auth`` only lets in nodes
whose public key was registered with ``flwr supernode register``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from retfm.errors import RetfmError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
LOOPBACK = "127.0.0.1"  # the SuperLink's own ServerApp process reaches it there, over the same TLS


def site_key_files(folder: Path, site: str) -> tuple[Path, Path]:
    """A site's authentication key pair: (private key, public key)."""
    return folder / f"{site}.key", folder / f"{site}.pub"


def make_credentials(folder: Path, hosts: list[str], sites: list[str], days: int = 365) -> list[Path]:
    """Write a CA, the SuperLink's certificate for ``hosts`` (IP addresses or DNS names; 127.0.0.1 is always
    added) and one authentication key pair per site into ``folder``; private keys are readable by their owner
    only. Returns the files written. Existing files are never overwritten."""
    folder = Path(folder)
    files = [folder / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    files += [path for site in sites for path in site_key_files(folder, site)]
    if existing := [str(path) for path in files if path.exists()]:
        raise RetfmError(f"{folder}: would overwrite {', '.join(existing)}; choose a new --out")
    if not hosts:
        raise RetfmError("give the SuperLink's address with --host (an IP address or DNS name the sites use)")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "retfm federation CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), now, days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [_san(host) for host in dict.fromkeys([*hosts, LOOPBACK])]
    server_cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name,
                            server_key.public_key(), now, days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_key_usage(cert_sign=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))

    (folder / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / CA_KEY, _pem(ca_key))
    (folder / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / SERVER_KEY, _pem(server_key))
    for site in sites:
        make_site_key(*site_key_files(folder, site))
    return files


def make_site_key(private: Path, public: Path) -> None:
    """A SuperNode authentication key pair: EC P-384, OpenSSH format (what ``flower-supernode`` and ``flwr
    supernode register`` read); the private key is readable by its owner only."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")


def check_site_key(path: Path) -> None:
    """Raise unless ``path`` holds an unencrypted OpenSSH EC private key (the kind SuperNodes authenticate with)."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise RetfmError(f"{path}: not a readable, unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RetfmError(f"{path}: SuperNode authentication needs an EC key (e.g. P-384), not {type(key).__name__}")


def check_ca(path: Path) -> None:
    """Raise unless ``path`` holds a PEM certificate."""
    try:
        x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise RetfmError(f"{path}: not a readable PEM certificate ({exc})") from None


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable and writable by its owner only (never briefly world-readable)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
