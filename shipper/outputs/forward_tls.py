"""TLS for the fluentd output: the client context (CA, checks, client certificate) and closing
with close_notify."""

from __future__ import annotations

import os
import socket
import ssl


class TLSSetupError(ValueError):
    """A CA, certificate or key file that cannot be loaded; ``key`` names the option."""

    def __init__(self, key: str, text: str):
        super().__init__(text)
        self.key = key


def tls_context(settings) -> ssl.SSLContext:
    """The client's TLS context: CA (or the system's), chain and host name checks, client certificate."""
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError("tls_ca", f"cannot load {settings.tls_ca!r}: {exc.strerror or exc}") from None
    if settings.tls_cert:
        for key in ("tls_cert", "tls_key"):
            path = getattr(settings, key)
            if path and not os.access(path, os.R_OK):
                raise TLSSetupError(key, f"cannot read {path!r}")
        try:
            context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
        except (OSError, ssl.SSLError) as exc:  # not PEM, no key in it, or a key of another certificate
            raise TLSSetupError("tls_cert" if not settings.tls_key else "tls_key",
                                f"cannot load the client certificate and its key: {exc}") from None
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not settings.tls_verify_hostname:
        context.check_hostname = False  # the chain is still verified
    return context


# Longest wait for a TLS peer to answer our close_notify (it is sent at once; the answer is only waited for).
UNWRAP_TIMEOUT = 1.0


def close_socket(sock: socket.socket) -> None:
    """Close ``sock``; a TLS one is unwrapped first (close_notify), never waiting more than UNWRAP_TIMEOUT."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.settimeout(UNWRAP_TIMEOUT)
            sock.unwrap()
        except (OSError, ValueError):  # not connected, broken, refused, or no answer in time: closed anyway
            pass
    try:
        sock.close()
    except OSError:
        pass
