"""Real XMPP servers (Prosody 0.12, ejabberd 23.01) for the test-suite.

Every server gets a private directory (config, data, logs) and listens on
127.0.0.1 only: BOSH over plain http on a free port, c2s on another free port,
no s2s, no https, no components. Plain Python, no pytest needed here; the
fixtures live in ``tests/conftest.py``.

    srv = start_prosody(tmpdir)            # or start_ejabberd(tmpdir)
    jid, password = srv.new_user()
    ...
    srv.stop()

All started servers are also stopped by an ``atexit`` backstop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ServerStartError",
    "XMPPServer",
    "free_port",
    "start_ejabberd",
    "start_prosody",
]

PROSODY_START_TIMEOUT = 15.0
EJABBERD_START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A server did not come up (message includes the log tail)."""


def free_port() -> int:
    """A TCP port that is currently free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<no log at {path}>"
    return "\n".join(text.splitlines()[-lines:])


def _system_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _as_user(user: str | None) -> list[str]:
    """Prefix that runs a command as ``user`` (only when we are root)."""
    if user is None:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]


def _give_to(path: Path, user: str | None) -> None:
    """Make ``path`` (recursively) owned by ``user`` and let it traverse the parents.

    pytest's temp dirs are 0700 root; the server user only needs ``x`` on them.
    """
    if user is None:
        return
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    tmp_root = Path(tempfile.gettempdir()).resolve()
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
        if parent == tmp_root or parent == Path("/"):
            break


_WATCHDOG = """
import os, signal, sys, time
parent, pgid = int(sys.argv[1]), int(sys.argv[2])
def alive(kill):
    try:
        kill(0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while alive(lambda s: os.kill(parent, s)) and alive(lambda s: os.killpg(pgid, s)):
    time.sleep(1)
for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 0)):
    if not alive(lambda s: os.killpg(pgid, s)):
        break
    os.killpg(pgid, sig)
    for _ in range(wait * 10):
        if not alive(lambda s: os.killpg(pgid, s)):
            break
        time.sleep(0.1)
"""

_RUNNING: set[ManagedProcess] = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all() -> None:
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        with contextlib.suppress(Exception):
            proc.stop()


atexit.register(_stop_all)


class ManagedProcess:
    """A server the tests start in its own process group on 127.0.0.1 and always stop: at
    ``stop()``, at exit (``atexit``), or, once the Python process that started it is gone
    (a SIGKILLed pytest), by a detached watchdog. Subclasses (dataclasses) hold ``_argv``,
    ``_env``, ``_console_path``, ``workdir``, ``_proc``, ``_watchdog`` and ``_lock``, and say
    which ports it listens on, when it is ready and what its logs say."""

    name: str
    workdir: Path
    start_timeout: float
    stop_timeout: float
    last_start_seconds: float
    _argv: list[str]
    _env: dict[str, str]
    _console_path: Path | None
    _proc: subprocess.Popen[bytes] | None
    _watchdog: subprocess.Popen[bytes] | None
    _lock: threading.Lock

    def _ports(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether it answers (polled until ``start_timeout``)."""
        raise NotImplementedError

    def _where(self) -> str:
        """Where ``_ready`` asks, for the message when it never answers."""
        raise NotImplementedError

    def _log_tail(self) -> str:
        raise NotImplementedError

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """(Re)start on the same ports and data; return once it answers."""
        with self._lock:
            if self.is_running():
                return
            for port in self._ports():
                if _port_open(port):
                    raise ServerStartError(f"{self.name}: port {port} is already in use")
            t0 = time.monotonic()
            assert self._console_path is not None
            console = open(self._console_path, "ab")  # noqa: SIM115
            try:
                self._proc = subprocess.Popen(
                    self._argv,
                    env=self._env,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C in the terminal does not reach it
                )
            finally:
                console.close()
            with _RUNNING_LOCK:
                _RUNNING.add(self)
            self._start_watchdog()
            try:
                self._wait_ready(t0 + self.start_timeout)
            except BaseException:
                self._kill()
                raise
            self.last_start_seconds = time.monotonic() - t0

    def _start_watchdog(self) -> None:
        """Backstop for a SIGKILLed pytest (atexit does not run): a detached process that
        SIGTERMs the server's process group once this Python process is gone."""
        assert self._proc is not None
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self._proc.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _stop_watchdog(self) -> None:
        wd, self._watchdog = self._watchdog, None
        if wd is not None:
            with contextlib.suppress(ProcessLookupError):
                wd.kill()
            wd.wait(5)

    def _wait_ready(self, deadline: float) -> None:
        while True:
            assert self._proc is not None
            rc = self._proc.poll()
            if rc is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {rc} during startup\n"
                    f"--- log tail ---\n{self._log_tail()}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} did not answer on {self._where()} within "
                    f"{self.start_timeout:.0f} s\n--- log tail ---\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it and wait until its ports are closed."""
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the server is its own process group
            _killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            # wait for the whole group (ejabberd: beam.smp under bash) to exit gracefully
            while (proc.poll() is None or _group_alive(pgid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None or _group_alive(pgid):
                _killpg(pgid, signal.SIGKILL)
            proc.wait(10)
            self._proc = None
        self._stop_watchdog()
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        deadline = time.monotonic() + self.stop_timeout
        while any(_port_open(p) for p in self._ports()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: ports still open after stop()")
            time.sleep(0.05)

    def __hash__(self) -> int:
        return id(self)


@dataclass(eq=False)
class XMPPServer(ManagedProcess):
    kind: str  # "prosody" or "ejabberd"
    service_url: str  # BOSH endpoint, http://127.0.0.1:PORT/http-bind
    domain: str  # normal virtual host
    anon_domain: str | None  # host with SASL ANONYMOUS (None if unsupported)
    secure: bool  # server treats BOSH as secure (offers PLAIN over http)
    workdir: Path = field(repr=False)
    http_port: int = field(repr=False)
    c2s_port: int = field(repr=False)
    log_path: Path = field(repr=False)
    start_timeout: float = field(repr=False, default=PROSODY_START_TIMEOUT)
    stop_timeout: float = field(repr=False, default=STOP_TIMEOUT)
    last_start_seconds: float = field(repr=False, default=0.0)
    _argv: list[str] = field(repr=False, default_factory=list)
    _env: dict[str, str] = field(repr=False, default_factory=dict)
    _console_path: Path | None = field(repr=False, default=None)
    _proc: subprocess.Popen[bytes] | None = field(repr=False, default=None)
    _watchdog: subprocess.Popen[bytes] | None = field(repr=False, default=None)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    # -- users --------------------------------------------------------------
    def register(self, username: str, password: str) -> str:
        """Create (or re-create with this password) ``username@domain``; return the bare JID."""
        raise NotImplementedError

    def new_user(self, prefix: str = "u") -> tuple[str, str]:
        username = f"{prefix}{secrets.token_hex(5)}".lower()
        password = secrets.token_urlsafe(12)
        return self.register(username, password), password

    # -- process ------------------------------------------------------------
    def log_text(self) -> str:
        parts = []
        for p in (self.log_path, self._console_path):
            if p is not None and p.exists():
                text = p.read_text(errors="replace")
                if text.strip():
                    parts.append(f"===== {p.name} =====\n{text}")
        return "\n".join(parts)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.service_url, timeout=2) as resp:
                resp.read()
                return True
        except urllib.error.HTTPError as exc:  # any HTTP answer means the listener is up
            exc.close()
            return True
        except OSError:
            return False

    def _where(self) -> str:
        return self.service_url

    def _log_tail(self) -> str:
        out = _tail(self.log_path)
        if self._console_path is not None:
            out += "\n--- console ---\n" + _tail(self._console_path, 30)
        return out

    def _ports(self) -> tuple[int, ...]:
        return (self.http_port, self.c2s_port)


# ---------------------------------------------------------------------------
# Prosody
# ---------------------------------------------------------------------------

PROSODY_CFG = """\
-- generated by tests/support/xmpp_servers.py
pidfile = "{work}/prosody.pid"
data_path = "{work}/data"
certificates = "{work}/certs"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{work}/prosody.log" }} }}
admins = {{ }}

-- every listener on loopback; no s2s, https, components, direct TLS
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
s2s_direct_tls_ports = {{ }}
component_ports = {{ }}
http_interfaces = {{ "127.0.0.1" }}
http_ports = {{ {http_port} }}
https_interfaces = {{ "127.0.0.1" }}
https_ports = {{ }}
http_default_host = "{domain}"

modules_enabled = {{
    "bosh"; "saslauth"; "roster"; "disco"; "ping"; "time"; "version";
}}
modules_disabled = {{ "s2s"; "s2s_bidi"; "s2s_auth_certs"; "offline" }}

storage = "internal"
authentication = "{auth}"
-- internal_hashed: which SCRAM hash the stored keys are for (the one mechanism it offers)
password_hash = "{password_hash}"
c2s_require_encryption = false
allow_unencrypted_plain_auth = false
consider_bosh_secure = {secure}
bosh_max_inactivity = 60
-- CORS for BOSH (0.12 default, made explicit; cross_domain_bosh is deprecated in 0.12)
http_cors_override = {{ bosh = {{ enabled = true }} }}
limits = {{ c2s = {{ rate = "1mb/s" }} }}

VirtualHost "{domain}"

VirtualHost "{anon_domain}"
    authentication = "anonymous"
    allow_anonymous_s2s = false
"""


@dataclass(eq=False)
class ProsodyServer(XMPPServer):
    config_path: Path = field(repr=False, default=Path())
    run_as: str | None = field(repr=False, default=None)

    def register(self, username: str, password: str) -> str:
        username = username.lower()
        cmd = [
            *_as_user(self.run_as),
            "prosodyctl",
            "--config",
            str(self.config_path),
            "register",
            username,
            self.domain,
            password,
        ]
        res = subprocess.run(
            cmd, env=self._env, cwd=self.workdir, capture_output=True, text=True, timeout=30
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"prosodyctl register {username}@{self.domain} failed ({res.returncode}):\n"
                f"{res.stdout}\n{res.stderr}"
            )
        return f"{username}@{self.domain}"


def start_prosody(
    workdir: Path,
    *,
    secure: bool = False,
    password_hash: str = "SHA-1",
    settings: dict[str, str] | None = None,
) -> XMPPServer:
    """Start a private Prosody 0.12 in ``workdir`` (created if needed). ``settings``: global
    options (name -> Lua value) in place of the usual ones, or added (a site's own
    configuration; Prosody refuses an option set twice).

    ``secure``: plain password store and BOSH treated as secure (PLAIN, SCRAM-SHA-1 and
    SCRAM-SHA-256 offered, every SCRAM login salted afresh); otherwise hashed storage, whose
    one SCRAM mechanism is ``password_hash``'s (stable salt: a client can cache its keys)."""
    workdir = Path(workdir).resolve()
    for sub in ("data", "certs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    http_port, c2s_port = free_port(), free_port()
    while c2s_port == http_port:
        c2s_port = free_port()
    domain, anon_domain = "localhost", "anon.localhost"
    cfg = workdir / "prosody.cfg.lua"
    cfg.write_text(
        PROSODY_CFG.format(
            work=workdir,
            http_port=http_port,
            c2s_port=c2s_port,
            domain=domain,
            anon_domain=anon_domain,
            auth="internal_plain" if secure else "internal_hashed",
            secure="true" if secure else "false",
            password_hash=password_hash,
        )
    )
    for name, value in (settings or {}).items():
        text, n = re.subn(rf"(?m)^{name} = .*$", f"{name} = {value}", cfg.read_text())
        if not n:
            text = text.replace("\nVirtualHost ", f"\n{name} = {value}\nVirtualHost ", 1)
        cfg.write_text(text)
    run_as = "prosody" if os.geteuid() == 0 else None
    if run_as and _system_user(run_as) is None:
        raise ServerStartError("running as root but there is no 'prosody' system user")
    log_path = workdir / "prosody.log"
    log_path.touch()
    _give_to(workdir, run_as)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
    }
    argv = [*_as_user(run_as), "prosody", "-F", "--config", str(cfg)]
    srv = ProsodyServer(
        kind="prosody",
        service_url=f"http://{HOST}:{http_port}/http-bind",
        domain=domain,
        anon_domain=anon_domain,
        secure=secure,
        workdir=workdir,
        http_port=http_port,
        c2s_port=c2s_port,
        log_path=log_path,
        start_timeout=PROSODY_START_TIMEOUT,
        _argv=argv,
        _env=env,
        _console_path=workdir / "console.log",
        config_path=cfg,
        run_as=run_as,
    )
    srv.start()
    return srv


# ---------------------------------------------------------------------------
# ejabberd
# ---------------------------------------------------------------------------

EJABBERD_YML = """\
# generated by tests/support/xmpp_servers.py
hosts:
  - "{domain}"
  - "{anon_domain}"
loglevel: info
log_rotate_count: 0
hide_sensitive_log_data: false
acme:
  auto: false
certfiles: []
language: en

listen:
  -
    port: {c2s_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    access: c2s
    starttls: false
  -
    port: {http_port}
    ip: "127.0.0.1"
    module: ejabberd_http
    tls: false
    request_handlers:
      "/http-bind": mod_bosh
    custom_headers:
      "Access-Control-Allow-Origin": "*"
      "Access-Control-Allow-Headers": "Content-Type"
      "Access-Control-Allow-Methods": "GET, POST, OPTIONS"

auth_method: internal
auth_password_format: plain
disable_sasl_mechanisms:
  - "digest-md5"
  - "X-OAUTH2"
s2s_access: none

host_config:
  "{anon_domain}":
    auth_method: anonymous
    anonymous_protocol: sasl_anon
    allow_multiple_connections: true

acl:
  local:
    user_regexp: ""
  loopback:
    ip:
      - 127.0.0.0/8

access_rules:
  local:
    allow: local
  c2s:
    allow: all

shaper_rules:
  max_user_sessions: 100

modules:
  mod_admin_extra: {{}}
  mod_bosh: {{}}
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_time: {{}}
  mod_version:
    show_os: false
"""

EJABBERDCTL_CFG = """\
# generated by tests/support/xmpp_servers.py
ERLANG_NODE={node}
# Erlang distribution: no epmd, fixed port, loopback only
ERL_DIST_PORT={dist_port}
ERL_EPMD_ADDRESS=127.0.0.1
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 -kernel inet_dist_use_interface {{127,0,0,1}}"
EJABBERD_BYPASS_WARNINGS=true
CONTRIB_MODULES_PATH={work}/contrib
CONTRIB_MODULES_CONF_DIR={work}/contrib/conf
"""

EJABBERDCTL = shutil.which("ejabberdctl", path="/usr/sbin:/usr/bin:/sbin:/bin") or (
    "/usr/sbin/ejabberdctl"
)


@dataclass(eq=False)
class EjabberdServer(XMPPServer):
    node: str = field(repr=False, default="")
    dist_port: int = field(repr=False, default=0)
    _ctl: list[str] = field(repr=False, default_factory=list)

    def _ports(self) -> tuple[int, ...]:
        return (self.http_port, self.c2s_port, self.dist_port)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``ejabberdctl <args>`` against this node."""
        return subprocess.run(
            [*self._ctl, *args],
            env=self._env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, username: str, password: str) -> str:
        username = username.lower()
        res = self.ctl("register", username, self.domain, password)
        if res.returncode != 0:
            out = res.stdout + res.stderr
            if "already registered" not in out and "conflict" not in out:
                raise RuntimeError(
                    f"ejabberdctl register {username}@{self.domain} failed "
                    f"({res.returncode}):\n{out}"
                )
            res = self.ctl("change_password", username, self.domain, password)
            if res.returncode != 0:
                raise RuntimeError(
                    f"ejabberdctl change_password {username}@{self.domain} failed:\n"
                    f"{res.stdout}{res.stderr}"
                )
        return f"{username}@{self.domain}"


def start_ejabberd(workdir: Path, *, modules: str = "") -> XMPPServer:
    """Start a private ejabberd 23.01 node in ``workdir`` (created if needed). ``modules``:
    YAML lines added to its ``modules:`` section (a site's own configuration)."""
    workdir = Path(workdir).resolve()
    etc, logs, spool = workdir / "etc", workdir / "logs", workdir / "spool"
    for d in (etc, logs, spool, workdir / "contrib" / "conf"):
        d.mkdir(parents=True, exist_ok=True)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    http_port, c2s_port, dist_port = sorted(ports)
    domain, anon_domain = "localhost", "anon.localhost"
    node = f"ejabberd-{os.getpid()}-{secrets.token_hex(3)}@localhost"
    (etc / "ejabberd.yml").write_text(
        EJABBERD_YML.format(
            domain=domain, anon_domain=anon_domain, http_port=http_port, c2s_port=c2s_port
        )
        + modules
    )
    (etc / "ejabberdctl.cfg").write_text(
        EJABBERDCTL_CFG.format(node=node, dist_port=dist_port, work=workdir)
    )
    (etc / "inetrc").write_text('{lookup,["file","native"]}.\n{host,{127,0,0,1}, ["localhost"]}.\n')
    cookie = workdir / ".erlang.cookie"
    if not cookie.exists():
        cookie.write_text(secrets.token_hex(16).upper())
    os.chmod(cookie, 0o400)
    (logs / "ejabberd.log").touch()

    run_as: str | None = None
    ctl_script = EJABBERDCTL
    if os.geteuid() == 0:
        run_as = "ejabberd" if _system_user("ejabberd") else None
    if run_as is None:
        # ejabberdctl only runs as root or as its install user: use a copy without that check
        text = Path(EJABBERDCTL).read_text()
        text = re.sub(r"(?m)^INSTALLUSER=.*$", "INSTALLUSER=", text)
        patched = workdir / "ejabberdctl"
        patched.write_text(text)
        patched.chmod(0o755)
        ctl_script = str(patched)
    _give_to(workdir, run_as)

    base = [
        *_as_user(run_as),
        "bash",
        ctl_script,
        "--config-dir",
        str(etc),
        "--config",
        str(etc / "ejabberd.yml"),
        "--ctl-config",
        str(etc / "ejabberdctl.cfg"),
        "--logs",
        str(logs),
        "--spool",
        str(spool),
        "--node",
        node,
    ]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(workdir),  # .erlang.cookie lives here
        "LANG": "C.UTF-8",
        "EJABBERD_PID_PATH": str(workdir / "ejabberd.pid"),
    }
    srv = EjabberdServer(
        kind="ejabberd",
        service_url=f"http://{HOST}:{http_port}/http-bind",
        domain=domain,
        anon_domain=anon_domain,
        secure=False,
        workdir=workdir,
        http_port=http_port,
        c2s_port=c2s_port,
        log_path=logs / "ejabberd.log",
        start_timeout=EJABBERD_START_TIMEOUT,
        _argv=[*base, "foreground"],
        _env=env,
        _console_path=workdir / "console.log",
        node=node,
        dist_port=dist_port,
        _ctl=base,
    )
    srv.start()
    return srv
