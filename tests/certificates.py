"""Self-signed certificates for the TLS tests: the one openssl command they all use."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["self_signed"]


def self_signed(where: Path, names: str = "DNS:localhost,IP:127.0.0.1",
                stem: str = "") -> tuple[Path, Path]:
    """A self-signed EC certificate (its own CA) for ``names`` (a subjectAltName list),
    written under ``where``: ``(cert, key)``, valid two days."""
    cert, key = where / f"{stem}cert.pem", where / f"{stem}key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", f"subjectAltName={names}"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return cert, key
