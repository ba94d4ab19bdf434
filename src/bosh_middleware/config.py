"""The middleware's settings, shared by every adapter (each only translates its framework's way
of spelling them: keyword arguments, ``settings.BOSH_PREBIND``, ``app.config["BOSH_*"]``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .credentials import Credentials
from .http11 import redact_url
from .inject import script_snippet
from .session import PrebindOptions

__all__ = ["CredentialsCallable", "MiddlewareConfig", "Mode"]

Mode = Literal["script", "headers", "both"]
CredentialsCallable = Callable[[Any], "Credentials | Awaitable[Credentials | None] | None"]


@dataclass(frozen=True)
class MiddlewareConfig:
    #: BOSH endpoint as the *web server* reaches it (may be an internal address).
    service_url: str
    #: ``(user) -> Credentials | None`` (sync or async); ``None``: no XMPP session for this user.
    credentials: CredentialsCallable
    #: Where the session goes: a ``<script>`` in the page, response headers, or both.
    mode: Mode = "script"
    #: Script variable names for JID, SID and RID.
    variables: tuple[str, str, str] = ("BOSH_JID", "BOSH_SID", "BOSH_RID")
    #: If set, also written into the page as ``BOSH_SERVICE``: the BOSH URL as *browsers* reach it.
    public_service_url: str | None = None
    service_variable: str = "BOSH_SERVICE"
    header_names: tuple[str, str, str] = ("X-BOSH-JID", "X-BOSH-SID", "X-BOSH-RID")
    #: JSON endpoint for converse.js ``prebind_url``; ``None`` disables it.
    endpoint_path: str | None = "/bosh/prebind"
    #: Path prefixes never prebound for (static files, APIs, admin ...).
    exclude_paths: Sequence[str] = ()
    #: Longest a page waits for its session (s); after that it is served without one.
    timeout: float = 3.0
    #: Consecutive failures that open the circuit breaker, and how long it stays open (s).
    breaker_threshold: int = 5
    breaker_reset: float = 30.0
    #: Engine settings (SASL mechanisms, wait, TLS headers ...). Its per-request timeout is capped
    #: at ``timeout`` so that a slow server cannot keep a prebind alive past the page's patience.
    options: PrebindOptions = field(default_factory=PrebindOptions)
    #: TLS verification for the BOSH endpoint: True, a CA bundle path or an ``ssl.SSLContext``.
    verify: Any = True

    def __post_init__(self) -> None:
        if not self.service_url:
            raise ValueError("service_url is required")
        if not callable(self.credentials):
            raise TypeError("credentials must be a callable (user) -> Credentials | None")
        if isinstance(self.exclude_paths, str):  # "/static" is one prefix, not 7 of them
            object.__setattr__(self, "exclude_paths", (self.exclude_paths,))
        if self.mode not in ("script", "headers", "both"):
            raise ValueError(f"mode must be 'script', 'headers' or 'both', not {self.mode!r}")
        names = [*self.variables, self.service_variable]
        script_snippet([(n, "") for n in names])  # raises on a name that is not an identifier
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.options.timeout > self.timeout:
            object.__setattr__(
                self, "options", dataclasses.replace(self.options, timeout=self.timeout)
            )

    def __repr__(self) -> str:
        """The dataclass's repr, but with the URLs' passwords redacted: a config ends up in
        debug pages, error reports and logs."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_url") and isinstance(value, str):
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> MiddlewareConfig:
        """Build from settings keys (``SERVICE_URL``, ``CREDENTIALS``, ``MODE`` ...), as Django's
        ``BOSH_PREBIND`` dict and Flask's ``BOSH_*`` config spell them, or in lower case, as the
        ASGI/WSGI adapters take them as keyword arguments. Engine
        settings (``WAIT``, ``MECHANISMS``, ``ALLOW_INSECURE_PLAIN`` ...) go to ``options``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        option_fields = {f.name for f in dataclasses.fields(PrebindOptions)}
        kwargs: dict[str, Any] = {}
        opts: dict[str, Any] = {}
        for key, value in values.items():
            name = key.lower()
            if name in fields:
                kwargs[name] = tuple(value) if isinstance(value, list) else value
            elif name in option_fields:
                opts[name] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"unknown BOSH prebind setting: {key}")
        kwargs.update(overrides)
        if opts:
            base = kwargs.get("options") or PrebindOptions()
            kwargs["options"] = dataclasses.replace(base, **opts)
        return cls(**kwargs)
