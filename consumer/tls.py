"""Which certificate authorities the worker's HTTPS clients trust.

One rule for every client (Userpilot's, the registry's, `delete-users`'): a configured
bundle (USERPILOT_CA_BUNDLE, Userpilot's clients only), else what the environment
names (`SSL_CERT_FILE` / `SSL_CERT_DIR`, as httpx reads them), else certifi's. The
clients are built with `trust_env=False` (their proxy is given explicitly), so the
environment's CA variables are read here.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import urlsplit

import certifi

__all__ = ["ca_location", "librdkafka_path", "ssl_context", "verification"]


def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Trusted CAs: `ca_bundle` (USERPILOT_CA_BUNDLE) if set, else $SSL_CERT_FILE /
    $SSL_CERT_DIR, else certifi's bundle (what httpx trusts by default)."""
    cafile = ca_bundle or os.environ.get("SSL_CERT_FILE") or None
    capath = None if cafile else os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile, capath=capath)


LIBRDKAFKA_CA_DEFAULT = "/etc/pki/tls/certs/ca-bundle.crt"
"""Where librdkafka's wheel looks for CAs for HTTPS (its OIDC token requests): CentOS's
place, which Debian (the image's) does not have."""


def librdkafka_path(path: str) -> str | None:
    """`path` (as the locale gave it) as librdkafka opens it, from the UTF-8 that
    confluent-kafka encodes: the path's own bytes read as UTF-8; None when they are not."""
    try:
        return os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return None


def ca_location() -> str | None:
    """For librdkafka's `https.ca.location` (the OIDC token endpoint's CAs): $SSL_CERT_FILE,
    else None where librdkafka's own default is there (a RHEL-like system's bundle, with its
    own CAs), else certifi's bundle. Not $SSL_CERT_DIR: librdkafka 2.16 takes no directory
    there ("error adding trust anchors", review "diff58b")."""
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile:
        # librdkafka opens it from the UTF-8 bytes confluent-kafka encodes: the path's own
        # bytes, not the locale's reading of them (a Latin-1 locale named another file,
        # review "diff60c").
        # Not UTF-8: refused by `config` (surrogates crashed the client).
        return librdkafka_path(cafile) or cafile
    return None if os.path.exists(LIBRDKAFKA_CA_DEFAULT) else certifi.where()


def verification(*urls: str | None, ca_bundle: str | None = None) -> ssl.SSLContext:
    """The context for a client whose requests go to `urls` (its server, its proxy).

    The CA store (certifi's: ~2.5 MB of RSS) is loaded only when one of them uses TLS; for
    plain HTTP the context trusts no CA at all: a TLS handshake could only fail, never
    trust by accident.
    """
    if any(url and urlsplit(url).scheme == "https" for url in urls):
        return ssl_context(ca_bundle)
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
