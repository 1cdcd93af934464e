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


def close_socket(sock: socket.socket) -> None:
    """Close ``sock``; a TLS one sends close_notify first, without waiting for the peer's."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            # Non-blocking: our close_notify goes out at once; the peer's answer is not waited for
            # (a peer that never answers would hold the runner, once per connection).
            sock.setblocking(False)
            sock.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # sent; the answer would come later
        except (OSError, ValueError):  # not connected, broken or refused: closed anyway
            pass
    try:
        sock.close()
    except OSError:
        pass
