"""Bearer-token authentication for every route but the health checks.

Tokens come from an environment variable (comma-separated) and/or a file (one a line); the file is re-read when
it changes, so a token can be rotated without a restart. A presented token is compared with every configured
token in constant time (hmac.compare_digest over SHA-256 digests, so lengths leak nothing either), and the loop
never stops early, so the time taken says nothing about which token, or how much of one, matched.
Tokens never appear in a log line, a response or an exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .settings import ControllerSettings

MIN_TOKEN_CHARS = 16


class TokenError(RuntimeError):
    """No usable token is configured: the controller refuses to start rather than run open."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenStore:
    def __init__(self, env_var: str, file: Path | None, env: dict[str, str] | None = None):
        self._env_var = env_var
        self._file = file
        self._env = env
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._digests: tuple[bytes, ...] = ()
        self._reload(force=True)
        if not self._digests:
            where = f"${env_var}" + (f" or {file}" if file else "")
            raise TokenError(f"no bearer token configured: set {where} (tokens of at least {MIN_TOKEN_CHARS} chars)")

    @classmethod
    def from_settings(cls, settings: ControllerSettings, env: dict[str, str] | None = None) -> "TokenStore":
        return cls(settings.token_env, settings.token_file, env)

    def _read(self) -> list[str]:
        env = os.environ if self._env is None else self._env
        tokens = [t.strip() for t in env.get(self._env_var, "").split(",")]
        if self._file is not None and self._file.exists():
            for line in self._file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    tokens.append(line)
        tokens = [t for t in tokens if t]
        short = [i for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_CHARS]
        if short:
            # Name the position, never the token.
            raise TokenError(f"bearer token #{short[0] + 1} is shorter than {MIN_TOKEN_CHARS} characters")
        return tokens

    def _reload(self, force: bool = False) -> None:
        mtime = None
        if self._file is not None:
            try:
                mtime = self._file.stat().st_mtime
            except FileNotFoundError:
                mtime = None
        if not force and mtime == self._file_mtime:
            return
        with self._lock:
            self._digests = tuple(_digest(t) for t in self._read())
            self._file_mtime = mtime

    def check(self, presented: str) -> bool:
        self._reload()
        probe = _digest(presented)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(probe, d)  # no short-circuit: same work whichever token matches
        return ok


_bearer = HTTPBearer(auto_error=False, description="a controller token (FLOWBP_TOKENS or the token file)")


class RequireToken:
    """FastAPI dependency: 401 unless the request carries a valid `Authorization: Bearer <token>`."""

    def __init__(self, tokens: TokenStore):
        self.tokens = tokens

    # Depends(_bearer) (rather than reading the header by hand) puts the scheme in the OpenAPI document.
    async def __call__(self, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if creds is None or not self.tokens.check(creds.credentials):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token (send `Authorization: Bearer <token>`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
