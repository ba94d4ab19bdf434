"""The middleware's settings, shared by every adapter (each only translates its framework's way
of spelling them: keyword arguments, ``settings.BOSH_PREBIND``, ``app.config["BOSH_*"]``)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .credentials import Credentials
from .http11 import check_header, check_url, redact_url, ssl_context
from .inject import script_snippet
from .session import (
    OPTION_CHECKS,
    PrebindOptions,
    check_bool,
    check_float,
    check_int,
    check_str,
    check_strs,
    check_timeout,
    redacted_repr,
)

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
    #: Prebind only for requests that say they load a page (``Sec-Fetch-Dest: document``, an
    #: ``Accept`` naming HTML: every browser sends them). Those that say nothing (curl, scripts,
    #: monitors; test clients not told to send ``Accept: text/html``) then pass through
    #: untouched, unwrapped, where by default their response is looked at and an HTML page gets
    #: a session.
    navigation_only: bool = False
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
        # Types are checked here, not at the first page: see session.py on settings as strings.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _CHECKS[f.name](f.name, value)
            if checked is not value:  # (a list as a tuple, "/static" as ("/static",))
                object.__setattr__(self, f.name, checked)
        names = [*self.variables, self.service_variable]
        script_snippet([(n, "") for n in names])  # raises on a name that is not an identifier
        if self.options.timeout > self.timeout:
            object.__setattr__(
                self, "options", dataclasses.replace(self.options, timeout=self.timeout)
            )

    def __repr__(self) -> str:
        return redacted_repr(
            self,
            service_url=redact_url,
            public_service_url=lambda url: url if url is None else redact_url(url),
        )

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        """Every setting ``from_mapping`` takes, in lower case: the fields and engine options."""
        return frozenset(f.name for f in dataclasses.fields(cls)) | frozenset(
            f.name for f in dataclasses.fields(PrebindOptions)
        )

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Any],
        *,
        prefix: str = "",
        adapter_settings: Iterable[str] = (),
        **overrides: Any,
    ) -> MiddlewareConfig:
        """Build from settings keys (``SERVICE_URL``, ``CREDENTIALS``, ``MODE`` ...), as Django's
        ``BOSH_PREBIND`` dict spells them, or in lower case, as the ASGI/WSGI adapters take them
        as keyword arguments; ``prefix`` is what every key starts with (Flask's ``BOSH_``), so
        that messages name the setting as it was written. Engine settings (``WAIT``,
        ``MECHANISMS``, ``ALLOW_INSECURE_PLAIN`` ...) go to ``options``. ``adapter_settings``:
        what the adapter read itself (Django's ``ENABLED``), for the likely meaning of a
        misspelt key. Every mistake is said at once."""
        fields = {f.name for f in dataclasses.fields(cls)}
        option_fields = {f.name for f in dataclasses.fields(PrebindOptions)}
        kwargs: dict[str, Any] = {}
        opts: dict[str, Any] = {}
        problems: list[TypeError | ValueError] = []
        for key, value in values.items():
            name = _setting_name(key, prefix)
            # Checked here too, so that the message names the setting as it was spelt
            # (BREAKER_THRESHOLD in Django's settings, breaker_threshold as a keyword argument).
            try:
                if name in fields:
                    kwargs[name] = _CHECKS[name](key, value)
                elif name in option_fields:
                    opts[name] = OPTION_CHECKS[name](key, value)
                else:
                    raise ValueError(
                        "unknown BOSH prebind setting: "
                        f"{key}{did_you_mean(key, prefix, adapter_settings)}"
                    )
            except (TypeError, ValueError) as exc:
                problems.append(exc)
        if len(problems) == 1:
            raise problems[0]
        if problems:  # every one at once, not one per restart of the app
            kind = TypeError if all(isinstance(p, TypeError) for p in problems) else ValueError
            raise kind("; ".join(str(p) for p in problems))
        kwargs.update(overrides)
        if opts:
            base = kwargs.get("options") or PrebindOptions()
            kwargs["options"] = dataclasses.replace(base, **opts)
        return cls(**kwargs)


def _setting_name(key: str, prefix: str) -> str:
    """The setting ``key`` names: without ``prefix``, in lower case (a field's name)."""
    return (key[len(prefix) :] if prefix and key.startswith(prefix) else key).lower()


def did_you_mean(key: str, prefix: str = "", also: Iterable[str] = ()) -> str:
    """A typo's likely meaning, spelt as ``key`` is (upper or lower case, with ``prefix``).
    ``also``: the names (lower case) of an adapter's own settings, which it reads itself
    (Flask's ``ENABLED``): a misspelt one is as likely, and as silent."""
    name = _setting_name(key, prefix)
    names = MiddlewareConfig.setting_names() | frozenset(also)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if not close:
        return ""
    meant = close[0].upper() if key.isupper() else close[0]
    return f" (did you mean {prefix}{meant}?)"


def _check_url(name: str, value: Any) -> str:
    if not isinstance(value, str):  # (its type only: its repr could hold a password)
        raise TypeError(f"{name} must be a URL string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} is required")
    try:
        check_url(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return value


def _check_public_url(name: str, value: Any) -> str | None:
    """The BOSH URL as browsers reach it: an http(s) URL (``//host/...`` too), or a path that
    they resolve against the page's origin ("/http-bind"); "" or None for none. It is written
    into every page, so it must hold no ``user:password@``: an internal ``SERVICE_URL`` that
    has one, copied here, would hand its password to every visitor."""
    if value is None:
        return None
    if not isinstance(value, str):  # (its type only: its repr could hold a password)
        raise TypeError(f"{name} must be a URL string, not {type(value).__name__}")
    if not value:  # (as good as None: nothing goes into the page)
        return value
    # (a browser reads "/\\host" as "//host": another host, not a path)
    if value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    try:
        parts = check_url(f"http:{value}" if value.startswith("/") else value)
    except ValueError as exc:
        raise ValueError(
            f"{name} must be an http(s) URL or a path such as '/http-bind': {exc}"
        ) from None
    if "@" in parts.netloc:  # (not shown: the password would be in the message)
        raise ValueError(
            f"{name} must not hold a user name or password (user:password@): it is written "
            "into every page"
        )
    return value


def _check_header_names(name: str, value: Any) -> tuple[str, ...]:
    names = check_strs(name, value, length=3)  # a bare string is a mistake, not one name
    for header in names:
        # (sent as they are: a line break in one would add lines to every response's head)
        try:
            check_header(header, "")
        except ValueError:
            raise ValueError(f"{name} must be HTTP header names, not {header!r}") from None
    return names


def _check_path(name: str, path: str) -> str:
    # Paths are compared with the request's, which starts with "/": "bosh/prebind" would
    # match no request, and "" (a prefix of every path) exclude them all. Both silently.
    if not path.startswith("/"):
        raise ValueError(f"{name} must be a path starting with '/', not {path!r}")
    return path


def _check_endpoint_path(name: str, value: Any) -> str | None:
    path = check_str(name, value, optional=True)
    return None if path is None else _check_path(name, path)


def _check_exclude_paths(name: str, value: Any) -> tuple[str, ...]:
    paths = check_strs(name, value)  # "/static" is one prefix, not 7 of them
    for path in paths:
        _check_path(name, path)
        if "," in path:  # (a list from the environment, as one string: it would match nothing)
            raise ValueError(f"{name} must list one path per item, not {path!r}")
    return paths


def _check_credentials(name: str, value: Any) -> Any:
    if not callable(value):
        raise TypeError(f"{name} must be a callable (user) -> Credentials | None")
    return value


def _check_mode(name: str, value: Any) -> str:
    if value not in ("script", "headers", "both"):
        raise ValueError(f"{name} must be 'script', 'headers' or 'both', not {value!r}")
    return str(value)


def _check_options(name: str, value: Any) -> PrebindOptions:
    if not isinstance(value, PrebindOptions):
        raise TypeError(f"{name} must be a PrebindOptions, not {type(value).__name__}")
    return value


#: What ``verify`` would mean if it came from the environment as text: a CA bundle path named
#: "False" would turn every prebind into a TLS error instead of turning verification off.
_BOOLEAN_WORDS = frozenset({"", "true", "false", "yes", "no", "on", "off", "0", "1"})


def _check_verify(name: str, value: Any) -> Any:
    if isinstance(value, (bool, ssl.SSLContext)):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be True, False, a CA bundle path or an ssl.SSLContext, "
            f"not {type(value).__name__}"
        )
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
        raise ValueError(
            f"{name} must be True, False, a CA bundle path or an ssl.SSLContext, "
            f"not the string {value!r}"
        )
    # Read it now: a path that is missing or holds no CA bundle would fail every prebind.
    try:
        ssl_context(value)
    except (OSError, ssl.SSLError) as exc:
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ValueError(f"{name}: no CA bundle at {os.fspath(value)!r} ({detail})") from None
    return value


#: How each ``MiddlewareConfig`` field is checked (and normalised): ``(name, value) -> value``.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "service_url": _check_url,
    "credentials": _check_credentials,
    "mode": _check_mode,
    # exactly three names each: a bare string is a mistake, not one name
    "variables": lambda n, v: check_strs(n, v, length=3),
    "public_service_url": _check_public_url,
    "service_variable": check_str,
    "header_names": _check_header_names,
    "endpoint_path": _check_endpoint_path,
    "exclude_paths": _check_exclude_paths,
    "navigation_only": check_bool,
    "timeout": check_timeout,
    # 0 (or less) turns the breaker off: see CircuitBreaker.allow
    "breaker_threshold": check_int,
    "breaker_reset": check_float,
    "options": _check_options,
    "verify": _check_verify,
}
