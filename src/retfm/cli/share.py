"""``retfm share ...``: keys, and encrypted, signed bundles of a de-identified ingest (secure uploads)."""

from __future__ import annotations

from pathlib import Path

import typer

from retfm.cli.common import stdout

app = typer.Typer(help="Secure uploads: a de-identified ingest as one encrypted, signed bundle for a coordinator "
                       "(see docs/federated.md).", no_args_is_help=True)


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="path prefix: writes PREFIX.key (private, owner-only) and "
                                                "PREFIX.pub (public); never overwrites"),
    role: str = typer.Option(..., "--role", help="coordinator (receives bundles: X25519 encryption keys) or "
                                                 "site (sends bundles: Ed25519 signing keys)"),
) -> None:
    """Create a key pair. Give only the .pub file away and confirm its fingerprint with the other side."""
    from retfm.share.bundle import generate_keys

    private_path, public_path, fingerprint = generate_keys(out, role)
    stdout.print(f"wrote {role} keys: {private_path} (private: keep it here) and {public_path} (public); "
                 f"fingerprint {fingerprint}", highlight=False)


@app.command()
def pack(
    data: Path = typer.Argument(..., help="a de-identified ingest folder (ingest with --deid-key-file, or "
                                          "`retfm data deid`)"),
    to: Path = typer.Option(..., "--to", help="the coordinator's public key (PREFIX.pub of "
                                              "`retfm share keygen --role coordinator`)"),
    sign: Path = typer.Option(..., "--sign", help="this site's private signing key (PREFIX.key of "
                                                  "`retfm share keygen --role site`)"),
    out: Path = typer.Option(..., "--out", help="bundle file to write"),
) -> None:
    """Encrypt a de-identified ingest for one coordinator and sign it: manifest, deid report and images only."""
    from retfm.share.bundle import pack as run_pack

    summary = run_pack(data, to, sign, out)
    stdout.print(f"packed {summary['images']} image(s) ({summary['files']} files, {summary['bytes']} bytes) into "
                 f"{out}; for coordinator key {summary['recipient'][:16]}, signed by site key "
                 f"{summary['sender'][:16]}", highlight=False)


@app.command()
def unpack(
    bundle: Path = typer.Argument(..., help="a bundle written by `retfm share pack`"),
    key: Path = typer.Option(..., "--key", help="the coordinator's private key (PREFIX.key of "
                                                "`retfm share keygen --role coordinator`)"),
    trust: list[Path] = typer.Option(..., "--trust", help="public key of a site whose bundles are accepted "
                                                          "(repeatable)"),
    out: Path = typer.Option(..., "--out", help="new (or empty) folder for the ingest; written only when every "
                                                "check passes"),
) -> None:
    """Verify a bundle (recipient, sender, signature, every chunk, checksums) and write the ingest it holds."""
    from retfm.share.bundle import unpack as run_unpack

    summary = run_unpack(bundle, key, trust, out)
    stdout.print(f"unpacked {summary['images']} image(s) ({summary['files']} files) from site key "
                 f"{summary['sender'][:16]} into {out}; all checks passed", highlight=False)
