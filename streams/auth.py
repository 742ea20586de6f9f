"""Who may call the HTTP API: bearer tokens with a name, a role and campaigns.

A token is ``adl_<id>_<secret>`` with 256 bits of randomness from ``secrets``. Only
its SHA-256 digest is stored (``hashlib``; a random token needs no slow password
hash, the same choice GitHub and Stripe make for API keys), in a JSON file of mode
0600 (``ADLOOP_TOKENS_FILE``, default ``<data_dir>/tokens.json``) that every serving
replica reads and re-reads when it changes, so a revocation takes effect without a
restart. The digest is compared in constant time (``hmac.compare_digest``).

Roles (each a set of permissions; ``ROLE_PERMISSIONS``):

* ``exchange``: select creatives;
* ``viewer``: read decisions, creatives, settings, review queue, audit;
* ``editor``: viewer + register and edit human-written creatives, edit the brief;
* ``reviewer``: viewer + approve, reject, pin, unpin;
* ``admin``: everything, settings (``auto_approve``, budgets, pause) included.

The permission each route needs is declared once, in ``ROUTE_PERMISSIONS``; a route
missing there is refused (the middleware fails closed). The *actor* of every write
and audit entry is the token's name (``human:<name>``), never a field of the body.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

Role = Literal["exchange", "viewer", "editor", "reviewer", "admin"]
Permission = Literal["select", "read", "edit", "review", "admin"]
ROLES: tuple[Role, ...] = ("exchange", "viewer", "editor", "reviewer", "admin")

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    "exchange": frozenset({"select"}),
    "viewer": frozenset({"read"}),
    "editor": frozenset({"read", "edit"}),
    "reviewer": frozenset({"read", "review"}),
    "admin": frozenset({"select", "read", "edit", "review", "admin"}),
}

#: (method, route template) -> the permission it needs; None = open (health probes).
ROUTE_PERMISSIONS: dict[tuple[str, str], Permission | None] = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
    ("POST", "/v1/select"): "select",
    ("POST", "/v1/select/batch"): "select",
    ("POST", "/v1/creatives"): "edit",
    ("GET", "/v1/campaigns/{campaign}/creatives"): "read",
    ("GET", "/v1/campaigns/{campaign}/audiences/{audience}/best"): "read",
    ("GET", "/v1/campaigns/{campaign}/audiences/{audience}/decision"): "read",
    ("GET", "/v1/campaigns/{campaign}/settings"): "read",
    # Which fields a caller may change is decided in the handler: the brief needs
    # "edit", auto_approve / pause / budget / pins need "admin".
    ("PUT", "/v1/campaigns/{campaign}/settings"): "edit",
    ("GET", "/v1/campaigns/{campaign}/review"): "read",
    ("GET", "/v1/campaigns/{campaign}/story"): "read",
    ("GET", "/v1/campaigns/{campaign}/audit"): "read",
    ("POST", "/v1/creatives/{creative_id}/approve"): "review",
    ("POST", "/v1/creatives/{creative_id}/reject"): "review",
    ("POST", "/v1/creatives/{creative_id}/pin"): "review",
    ("POST", "/v1/creatives/{creative_id}/unpin"): "review",
}

#: Where the middleware leaves the authenticated caller on the request.
PRINCIPAL = web.RequestKey("principal", "Principal")

_TOKEN = re.compile(r"^adl_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
ANY_CAMPAIGN = "*"


class AuthError(web.HTTPException):
    """401/403 with a JSON body (the API's error format)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": code, "message": message}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="adloop"'} if status == 401 else None,
        )


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    name: str
    role: Role
    campaigns: tuple[str, ...] = (ANY_CAMPAIGN,)
    token_id: str | None = None

    @property
    def actor(self) -> str:
        """The actor written into records and audit entries."""
        return f"human:{self.name}" if self.token_id else self.name

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def may_touch(self, campaign: str) -> bool:
        return ANY_CAMPAIGN in self.campaigns or campaign in self.campaigns

    def require(self, permission: Permission, campaign: str | None = None) -> None:
        """Raise 403 unless this caller has ``permission`` (on ``campaign``)."""
        if not self.can(permission):
            raise AuthError(
                403,
                "forbidden",
                f"token {self.name!r} has role {self.role!r}, which may not {permission}; "
                f"ask an admin for a token with a role that may",
            )
        if campaign is not None and not self.may_touch(campaign):
            raise AuthError(
                403,
                "forbidden_campaign",
                f"token {self.name!r} may not touch campaign {campaign!r} "
                f"(its campaigns: {', '.join(self.campaigns)})",
            )


#: The caller when a route needs no token (select on loopback, health probes).
ANONYMOUS = Principal(name="anonymous", role="exchange")


@dataclass
class TokenRecord:
    token_id: str
    name: str
    role: Role
    campaigns: list[str]
    sha256: str
    created_at: float
    revoked_at: float | None = None

    def principal(self) -> Principal:
        return Principal(self.name, self.role, tuple(self.campaigns), self.token_id)


def digest(secret_token: str) -> str:
    return hashlib.sha256(secret_token.encode()).hexdigest()


@dataclass
class TokenStore:
    """Tokens in a JSON file of mode 0600; reloaded when the file changes."""

    path: Path
    _records: dict[str, TokenRecord] = field(default_factory=dict)
    _mtime: float | None = None

    def load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._records, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        raw = json.loads(self.path.read_text() or "[]")
        self._records = {r["token_id"]: TokenRecord(**r) for r in raw}
        self._mtime = mtime

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two `adloop tokens create` at once lose nothing)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._mtime = None  # re-read under the lock
            self.load()
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _save(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(r) for r in self._records.values()], f, indent=2)
        os.replace(tmp, self.path)
        self._mtime = None

    def records(self) -> list[TokenRecord]:
        self.load()
        return list(self._records.values())

    def create(
        self, name: str, role: Role, campaigns: Iterable[str] = (ANY_CAMPAIGN,)
    ) -> tuple[TokenRecord, str]:
        """A new token; returns its record and the secret (shown once, never stored)."""
        if not _NAME.match(name):
            raise ValueError(
                f"token name {name!r}: lower-case letters, digits and . _ @ -, at most 64"
            )
        if role not in ROLE_PERMISSIONS:
            raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
        scope = sorted(set(campaigns)) or [ANY_CAMPAIGN]
        token_id = secrets.token_hex(6)
        secret = f"adl_{token_id}_{secrets.token_urlsafe(32)}"
        record = TokenRecord(token_id, name, role, scope, digest(secret), time.time())
        with self._locked():
            self._records[token_id] = record
            self._save()
        return record, secret

    def revoke(self, token_id: str) -> TokenRecord:
        with self._locked():
            record = self._records.get(token_id)
            if record is None:
                raise KeyError(f"no token {token_id!r}; `adloop tokens list` shows them")
            record.revoked_at = time.time()
            self._save()
        return record

    def authenticate(self, secret_token: str) -> Principal | None:
        match = _TOKEN.match(secret_token)
        if match is None:
            return None
        self.load()
        record = self._records.get(match.group(1))
        if record is None or record.revoked_at is not None:
            return None
        if not hmac.compare_digest(record.sha256, digest(secret_token)):
            return None
        return record.principal()


def ensure_admin_token(store: TokenStore, secret_path: Path) -> tuple[str, bool]:
    """The embedded stack's admin token: created on first start, its secret kept in
    ``secret_path`` (mode 0600). Returns (secret, created)."""
    if secret_path.exists():
        secret = secret_path.read_text().strip()
        if store.authenticate(secret) is not None:
            return secret, False
    _, secret = store.create("local-admin", "admin")
    secret_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret, True


def ensure_secret_file(path: Path) -> str:
    """A random secret kept in a 0600 file (made on first use): the embedded stack's
    audit key."""
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def auth_middleware(
    store: TokenStore, select_requires_token: bool
) -> Callable[[web.Request, Any], Awaitable[web.StreamResponse]]:
    """Authenticate every request and check the route's declared permission."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else request.path
        method = "GET" if request.method == "HEAD" else request.method
        key = (method, template)
        if key not in ROUTE_PERMISSIONS:
            if resource is None:  # 404/405 from the router: let it answer
                return await handler(request)
            raise AuthError(403, "forbidden", f"{method} {template} has no declared permission")
        needed = ROUTE_PERMISSIONS[key]
        token = bearer(request)
        principal = store.authenticate(token) if token else None
        if token and principal is None:
            raise AuthError(401, "invalid_token", "the bearer token is unknown or revoked")
        if needed is None or (needed == "select" and not select_requires_token and not token):
            request[PRINCIPAL] = principal or ANONYMOUS
            return await handler(request)
        if principal is None:
            raise AuthError(
                401,
                "unauthenticated",
                f"{method} {template} needs 'Authorization: Bearer <token>' "
                "(create one with `adloop tokens create`)",
            )
        principal.require(needed, request.match_info.get("campaign"))
        request[PRINCIPAL] = principal
        return await handler(request)

    return middleware


def principal_of(request: web.Request) -> Principal:
    return request.get(PRINCIPAL, ANONYMOUS)
