"""The bearer-token check of both transports (HTTP ``Authorization`` header, gRPC metadata).

A request carries ``authorization: Bearer <token>``: the scheme is case-insensitive
(RFC 9110 §11.1), surrounding blanks are ignored, and the token is compared with
:func:`hmac.compare_digest`, so the time taken does not tell how much of a guess was
right. Which paths or RPCs stay open (health checks, optionally ``/metrics``) is the
transport's decision; whether a credential is good is decided here only.
"""

from __future__ import annotations

import hmac

from bnexport.serve.protocol.errors import UnauthorizedError


class BearerToken:
    """The server's token (``None``: no auth, every request passes).

    Args:
        token: the secret clients must send.
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def required(self) -> bool:
        """Whether requests must carry the token."""
        return self._token is not None

    def accepts(self, authorization: bytes | str | None) -> bool:
        """Whether an ``authorization`` value (header or metadata) carries the token."""
        if self._token is None:
            return True
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, credential = (authorization or b"").strip().partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        ok_token = hmac.compare_digest(credential.strip(), self._token)
        return ok_scheme and ok_token

    def check(self, authorization: bytes | str | None, how: str) -> None:
        """Raise unless ``authorization`` carries the token.

        Args:
            authorization: the value the request sent (``None``: none).
            how: how the client sends it, for the message (``"Authorization: Bearer
                <token>"``, ``"metadata 'authorization: Bearer <token>'"``).

        Raises:
            UnauthorizedError: missing or wrong token (401 / UNAUTHENTICATED).
        """
        if not self.accepts(authorization):
            raise UnauthorizedError(f"missing or invalid bearer token ({how})")
