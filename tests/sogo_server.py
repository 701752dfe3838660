"""A real, independently written ActiveSync server for the tests: SOGo 5.8 from Debian.

Everything runs on loopback in one temp dir and is torn down afterwards:
PostgreSQL (SOGo's profile/folder/cache tables and the users table it authenticates
against), dovecot (IMAP, Maildir, the same users and passwords), memcached, an SMTP
sink of our own (it keeps what SOGo sends), ``sogod`` and nginx in front of it doing
what Debian's Apache config does: ``/Microsoft-Server-ActiveSync`` to
``/SOGo/Microsoft-Server-ActiveSync``.

None of these may run as root (initdb and sogod refuse), so when the tests run as root
every service runs as the ``sogo`` user the package creates. SOGo reads its settings
from GNUstep user defaults; ``GNUSTEP_CONFIG_FILE`` points them at the temp dir, so
/etc/sogo/sogo.conf only supplies what we do not set.

``python tests/sogo_server.py`` starts it by hand and prints the front's address.
"""
from __future__ import annotations

import glob
import imaplib
import os
import pwd
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import trio

USERS = {"jdoe": "secret-jdoe", "asmith": "secret-asmith"}
DOMAIN = "sogo.test"
FOLDERS = ("INBOX", "Sent", "Drafts", "Trash", "Archive", "Junk", "Templates")
START_TIMEOUT = 90.0


class SogoUnavailable(Exception):
    """A program SOGo's stack needs is not installed (the reason says which)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def missing_programs() -> list[str]:
    progs = {"sogod": "sogo", "dovecot": "dovecot-imapd", "memcached": "memcached", "nginx": "nginx-light"}
    missing = [f"{exe} ({pkg})" for exe, pkg in progs.items()
               if shutil.which(exe, path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) is None]
    if not Path("/usr/lib/GNUstep/SOGo/ActiveSync.SOGo").is_dir():
        missing.append("SOGo's ActiveSync bundle (sogo-activesync)")
    if _pg_bin() is None:
        missing.append("initdb (postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("sogo")
        except KeyError:
            missing.append("the sogo user (sogo)")
    return missing


# -- the SMTP sink --------------------------------------------------------------------------------

@dataclass
class Sent:
    sender: str
    recipients: list[str]
    data: bytes


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for SOGo: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def handle(self):
        sink = self.server.sink
        self.wfile.write(b"220 sink.sogo.test ESMTP\r\n")
        sender, rcpts = "", []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250-sink.sogo.test\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
                                 if verb == b"EHLO" else b"250 sink.sogo.test\r\n")
            elif verb == b"MAIL":
                sender, rcpts = line.split(b":", 1)[1].strip().split(b" ")[0].strip(b"<>").decode(), []
                self.wfile.write(b"250 OK\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.split(b":", 1)[1].strip().split(b" ")[0].strip(b"<>").decode())
                self.wfile.write(b"250 OK\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                lines = []
                while True:
                    dl = self.rfile.readline(1 << 20)
                    if not dl or dl in (b".\r\n", b".\n"):
                        break
                    lines.append(dl[1:] if dl.startswith(b"..") else dl)
                with sink.cond:
                    sink.messages.append(Sent(sender, rcpts, b"".join(lines)))
                    sink.cond.notify_all()
                self.wfile.write(b"250 OK queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:                                   # RSET, NOOP and anything else
                self.wfile.write(b"250 OK\r\n")


class SmtpSink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _SmtpHandler)
        self.sink = self
        self.messages: list[Sent] = []
        self.cond = threading.Condition()
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait_for(self, pred, timeout: float = 20.0) -> Sent:
        """The first message ``pred`` accepts, waiting for it up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no such message reached the SMTP sink")
                self.cond.wait(left)

    def close(self):
        self.shutdown()
        self.server_close()


# -- the stack ------------------------------------------------------------------------------------

def _plist(value) -> str:
    """A GNUstep (OpenStep) property list."""
    if isinstance(value, bool):
        return "YES" if value else "NO"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_plist(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + " ".join(f"{k} = {_plist(v)};" for k, v in value.items()) + "}"
    raise TypeError(value)


@dataclass
class SogoServer:
    base: Path
    front_port: int = 0
    sogo_port: int = 0
    imap_port: int = 0
    pg_port: int = 0
    memcached_port: int = 0
    smtp: SmtpSink | None = None
    procs: list = field(default_factory=list)
    startup_seconds: float = 0.0
    seeded: set = field(default_factory=set)

    @property
    def url(self) -> str:
        """What the gateway's upstream.url points at (the front)."""
        return f"http://127.0.0.1:{self.front_port}"

    # -- running things as the service user
    def _user(self) -> str:
        return "sogo" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _cmd(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "sogo", "--"] + argv if os.geteuid() == 0 else argv

    def _own(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("sogo")
            for p in paths:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _mkdir(self, *parts: str) -> Path:
        p = self.base.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        self._own(p)
        return p

    def _write(self, rel: str, text: str) -> Path:
        p = self.base / rel
        p.write_text(text)
        self._own(p)
        return p

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.base / f"{name}.out", "wb")
        proc = subprocess.Popen(self._cmd(argv), stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
                                env=env, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(self._cmd(argv), cwd=self.base, capture_output=True, text=True, **kw)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def log_tail(self, name: str, n: int = 4000) -> str:
        p = self.base / name
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    # -- start
    def start(self) -> "SogoServer":
        t0 = time.monotonic()
        self._own(self.base)
        self.pg_port, self.memcached_port, self.imap_port = free_port(), free_port(), free_port()
        self.sogo_port, self.front_port = free_port(), free_port()
        self.smtp = SmtpSink()
        self._start_postgres()
        self._start_memcached()
        self._start_dovecot()
        self._start_sogo()
        self._start_front()
        self._wait_ready()
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_postgres(self) -> None:
        pg = _pg_bin()
        data = self._mkdir("pg", "data")
        sock = self._mkdir("pg", "sock")
        self._run([str(pg / "initdb"), "-D", str(data), "-U", "sogo", "--auth=trust", "-E", "UTF8",
                   "--no-sync", "--locale=C"])
        self._spawn("postgres", [str(pg / "postgres"), "-D", str(data), "-p", str(self.pg_port),
                                 "-h", "127.0.0.1", "-k", str(sock), "-c", "fsync=off",
                                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
        deadline = time.monotonic() + 30
        while self._cmd_ok([str(pg / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.pg_port)]) is False:
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not start: " + self.log_tail("postgres.out"))
            time.sleep(0.1)
        self._run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "sogo", "sogo"])
        rows = ",".join(f"('{u}', '{u}', '{p}', '{u.title()} Test', '{u}@{DOMAIN}')" for u, p in USERS.items())
        self.psql("CREATE TABLE sogo_users (c_uid varchar(128) PRIMARY KEY, c_name varchar(128), "
                  "c_password varchar(128), c_cn varchar(128), mail varchar(128)); "
                  f"INSERT INTO sogo_users VALUES {rows};")

    def _cmd_ok(self, argv) -> bool:
        return subprocess.run(self._cmd(argv), capture_output=True).returncode == 0

    def psql(self, sql: str) -> str:
        return self._run([str(_pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "sogo",
                          "-d", "sogo", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql]).stdout

    def _start_memcached(self) -> None:
        self._spawn("memcached", ["memcached", "-l", "127.0.0.1", "-p", str(self.memcached_port), "-U", "0",
                                  "-m", "32"])

    def _start_dovecot(self) -> None:
        d = self._mkdir("dovecot")
        for sub in ("run", "state", "mail", "home"):
            self._mkdir("dovecot", sub)
        user = self._user()
        pw = pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
        self._write("dovecot/users", "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items()))
        conf = f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {user}
default_internal_group = {user}
default_login_user = {user}
mail_location = maildir:{d}/mail/%u
mail_fsync = never
first_valid_uid = {uid}
first_valid_gid = {gid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid={user} gid={user} home={d}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Archive {{
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Templates {{
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
service auth-worker {{
  user = {user}
}}
service auth {{
  user = {user}
}}
"""
        cfg = self._write("dovecot/dovecot.conf", conf)
        self._spawn("dovecot", ["dovecot", "-F", "-c", str(cfg)])

    def _start_sogo(self) -> None:
        home = self._mkdir("sogo")
        self._mkdir("sogo", "defaults")
        pg = f"postgresql://sogo:sogo@127.0.0.1:{self.pg_port}/sogo"
        defaults = {
            "WOPort": f"127.0.0.1:{self.sogo_port}",
            "WOWorkersCount": 6,
            "WOLogFile": str(home / "sogo.log"),
            "WOPidFile": str(home / "sogo.pid"),
            "SOGoProfileURL": f"{pg}/sogo_user_profile",
            "OCSFolderInfoURL": f"{pg}/sogo_folder_info",
            "OCSSessionsFolderURL": f"{pg}/sogo_sessions_folder",
            "OCSCacheFolderURL": f"{pg}/sogo_cache_folder",
            "OCSEMailAlarmsFolderURL": f"{pg}/sogo_alarms_folder",
            "OCSStoreURL": f"{pg}/sogo_store",
            "OCSAclURL": f"{pg}/sogo_acl",
            "SOGoUserSources": [{
                "type": "sql", "id": "users", "viewURL": f"{pg}/sogo_users", "canAuthenticate": True,
                "isAddressBook": False, "userPasswordAlgorithm": "plain", "displayName": "Test users"}],
            "SOGoIMAPServer": f"imap://127.0.0.1:{self.imap_port}",
            "SOGoSieveServer": "",
            "SOGoSMTPServer": f"smtp://127.0.0.1:{self.smtp.port}",
            "SOGoMailingMechanism": "smtp",
            "SOGoMailDomain": DOMAIN,
            "SOGoMemcachedHost": f"127.0.0.1:{self.memcached_port}",
            "SOGoSentFolderName": "Sent",
            "SOGoDraftsFolderName": "Drafts",
            "SOGoTrashFolderName": "Trash",
            "SOGoTimeZone": "UTC",
            "SOGoLanguage": "English",
            "SOGoAppointmentSendEMailNotifications": False,
            "SOGoEnableEMailAlarms": False,
            "SOGoVacationEnabled": False,
            "SOGoForwardEnabled": False,
            "SOGoSieveScriptsEnabled": False,
            "SOGoMailAuxiliaryUserAccountsEnabled": False,
            "SOGoIMAPAclConformsToIMAPExt": True,
            # Ping and Sync-with-Wait look for changes this often (seconds); the default 10
            # would make every Ping test wait 10 s for a delivery.
            "SOGoInternalSyncInterval": 1,
            "SOGoMaximumPingInterval": 300,
            "SOGoMaximumSyncInterval": 300,
            "SOGoMaximumSyncWindowSize": 100,
            "SOGoMaximumSyncResponseSize": 0,
            "NGImap4ConnectionStringSeparator": "/",
            # SEG_FAST_SOGO_DEBUG=1: every EAS request and answer in sogo/sogo.log (with bodies).
            "SOGoEASDebugEnabled": bool(os.environ.get("SEG_FAST_SOGO_DEBUG")),
            "ImapDebugEnabled": bool(os.environ.get("SEG_FAST_SOGO_DEBUG")),
        }
        (home / "defaults" / "sogod.plist").write_text(_plist(defaults) + "\n")
        self._own(home / "defaults" / "sogod.plist")
        system = Path("/etc/GNUstep/GNUstep.conf")
        system_conf = system.read_text() if system.exists() else ""
        lines = [ln for ln in system_conf.splitlines() if not ln.startswith(("GNUSTEP_USER_DEFAULTS_DIR",
                                                                             "GNUSTEP_USER_CONFIG_FILE"))]
        lines += [f"GNUSTEP_USER_DEFAULTS_DIR={home}/defaults", "GNUSTEP_USER_CONFIG_FILE="]
        self._write("sogo/GNUstep.conf", "\n".join(lines) + "\n")
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               "GNUSTEP_CONFIG_FILE": str(home / "GNUstep.conf")}
        self._spawn("sogod", ["/usr/sbin/sogod", "-WONoDetach", "YES", "-WOLogFile", str(home / "sogo.log")],
                    env=env)

    def _start_front(self) -> None:
        n = self._mkdir("nginx")
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            self._mkdir("nginx", sub)
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
pid {n}/nginx.pid;
error_log {n}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {n}/body;
  proxy_temp_path {n}/proxy;
  fastcgi_temp_path {n}/fastcgi;
  uwsgi_temp_path {n}/uwsgi;
  scgi_temp_path {n}/scgi;
  client_max_body_size 64m;
  server {{
    listen 127.0.0.1:{self.front_port};
    server_name sogo.test;
    # What Debian's /etc/apache2/conf-available/SOGo.conf does for ActiveSync.
    location /Microsoft-Server-ActiveSync {{
      proxy_pass http://127.0.0.1:{self.sogo_port}/SOGo/Microsoft-Server-ActiveSync;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header x-webobjects-server-protocol HTTP/1.0;
      proxy_set_header x-webobjects-remote-host $remote_addr;
      proxy_set_header x-webobjects-server-name $server_name;
      proxy_set_header x-webobjects-server-port $server_port;
      proxy_set_header x-webobjects-server-url http://$http_host;
      proxy_buffering off;
      proxy_request_buffering on;
      proxy_connect_timeout 10s;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }}
    location /SOGo {{
      proxy_pass http://127.0.0.1:{self.sogo_port};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
        cfg = self._write("nginx/nginx.conf", conf)
        self._spawn("nginx", ["nginx", "-c", str(cfg), "-p", str(n), "-e", str(n / "error.log")])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for name, port in (("dovecot", self.imap_port), ("memcached", self.memcached_port),
                           ("sogod", self.sogo_port), ("nginx", self.front_port)):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    pass
                dead = [(n, p.returncode) for n, p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not come up (exited: {dead}):\n{self.diagnostics()}")
                time.sleep(0.05)
        # Each user's IMAP login works (SOGo uses the device's password for IMAP), and
        # every folder tracks modification sequences: SOGo's Sync keys are
        # "UIDNEXT-HIGHESTMODSEQ" of a plain SELECT, and dovecot reports HIGHESTMODSEQ there
        # only for a mailbox some client has used CONDSTORE on (SOGo never ENABLEs it).
        for user in USERS:
            with self.imap(user) as conn:
                conn.enable("CONDSTORE")
                for folder in FOLDERS:
                    typ, data = conn.select(folder)
                    if typ != "OK" or not conn.untagged_responses.get("HIGHESTMODSEQ"):
                        raise RuntimeError(f"dovecot: {user} cannot open {folder} with modseqs: {data}\n"
                                           + self.diagnostics())

    def diagnostics(self) -> str:
        return "\n".join(f"--- {f}\n{self.log_tail(f, 1500)}" for f in
                         ("postgres.out", "dovecot.out", "dovecot/dovecot.log", "memcached.out", "sogod.out",
                          "sogo/sogo.log", "nginx.out", "nginx/error.log"))

    # -- mail
    @contextmanager
    def imap(self, user: str = "jdoe", password: str | None = None):
        conn = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=20)
        try:
            conn.login(user, password or USERS[user])
            yield conn
        finally:
            try:
                conn.logout()
            except Exception:
                pass

    def deliver(self, mime: bytes, user: str = "jdoe", folder: str = "INBOX") -> None:
        """Put a message into a user's folder (IMAP APPEND, as an MTA's delivery would)."""
        with self.imap(user) as conn:
            typ, data = conn.append(folder, None, None, mime)
            if typ != "OK":
                raise RuntimeError(f"APPEND failed: {data}")

    def ensure_seeded(self, user: str, messages: list[bytes]) -> None:
        """Deliver each message once per stack (tests sharing the stack share the mailbox)."""
        for mime in messages:
            if (user, mime) not in self.seeded:
                self.deliver(mime, user)
                self.seeded.add((user, mime))

    def stop(self) -> None:
        # Each service runs in a session of its own (start_new_session): signal the whole
        # group, so runuser's child and sogod's prefork workers get it too.
        for name, proc in reversed(self.procs):
            try:
                # postgres: SIGINT is its fast shutdown (SIGTERM waits for sogod's sessions)
                os.killpg(proc.pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 1.0       # nothing here keeps data worth a slow shutdown
        for name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name, proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        self.procs.clear()
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None


@contextmanager
def running_sogo():
    """A started SogoServer in a fresh temp dir; stopped and removed afterwards."""
    missing = missing_programs()
    if missing:
        raise SogoUnavailable("not installed: " + ", ".join(missing) + " (scripts/test.sh installs them)")
    base = Path(tempfile.mkdtemp(prefix="seg-fast-sogo-"))
    os.chmod(base, 0o755)
    server = SogoServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if not os.environ.get("SEG_FAST_KEEP_SOGO"):
            shutil.rmtree(base, ignore_errors=True)


def _unavailable(reason: str):
    # Locally a missing package skips; under CI the packages are part of the build, so fail.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SOGo stack unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sogo():
    """One SOGo stack for the whole test session (started on first use)."""
    missing = missing_programs()
    if missing:
        _unavailable("not installed: " + ", ".join(missing) + " (scripts/test.sh installs them)")
    with running_sogo() as server:
        print(f"\nSOGo stack up in {server.startup_seconds:.1f} s", flush=True)
        yield server


# -- a recording relay ----------------------------------------------------------------------------

@dataclass
class Exchange:
    """One HTTP exchange as it crossed the tap (read back with h11, not our parser)."""
    method: bytes
    target: bytes
    request_headers: list
    request_body: bytes
    status: int
    response_headers: list
    response_body: bytes
    started: float


class Tap:
    """A byte-for-byte TCP relay to ``port`` that keeps both directions of every
    connection, so a test can see exactly what a mail server was sent and answered."""

    def __init__(self, port: int):
        self.target = port
        self.port = 0
        self.conns: list[dict] = []
        self._changed = trio.Event()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    async def _relay(self, down):
        rec = {"c2s": [], "s2c": [], "opened": trio.current_time()}
        self.conns.append(rec)
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await down.aclose()
            return

        async def pump(src, dst, key):
            try:
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    rec[key].append((trio.current_time(), data))
                    self._wake()
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                with trio.move_on_after(1) as cs:
                    cs.shield = True
                    try:
                        await dst.send_eof() if hasattr(dst, "send_eof") else await dst.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass

        async with up, down:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, down, up, "c2s")
                nursery.start_soon(pump, up, down, "s2c")

    def _wake(self):
        self._changed.set()
        self._changed = trio.Event()

    def requests_seen(self) -> bytes:
        return b"".join(d for rec in self.conns for _, d in rec["c2s"])

    async def wait_until(self, pred, timeout: float = 20.0):
        with trio.fail_after(timeout):
            while not pred():
                await self._changed.wait()

    def exchanges(self) -> list[Exchange]:
        """Every complete exchange, in the order the requests started."""
        out = []
        for rec in self.conns:
            server = h11.Connection(h11.SERVER)
            reqs = []
            for t, data in rec["c2s"]:
                server.receive_data(data)
                while True:
                    ev = server.next_event()
                    if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                        break
                    if isinstance(ev, h11.Request):
                        reqs.append([ev, bytearray(), t])
                    elif isinstance(ev, h11.Data):
                        reqs[-1][1] += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        # answer it in our replica so the next request can be read
                        server.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                        server.send(h11.EndOfMessage())
                        if server.our_state is h11.DONE and server.their_state is h11.DONE:
                            server.start_next_cycle()
                        else:
                            break
            client = h11.Connection(h11.CLIENT)
            client.receive_data(b"".join(d for _, d in rec["s2c"]))
            for req, body, t in reqs:
                client.send(h11.Request(method=req.method, target=req.target, headers=req.headers))
                client.send(h11.Data(data=bytes(body))) if body else None
                client.send(h11.EndOfMessage())
                resp, rbody = None, bytearray()
                while True:
                    ev = client.next_event()
                    if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
                        break
                    if isinstance(ev, h11.Response):
                        resp = ev
                    elif isinstance(ev, h11.Data):
                        rbody += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                if resp is None:
                    break
                out.append(Exchange(req.method, req.target, req.headers, bytes(body), resp.status_code,
                                    resp.headers, bytes(rbody), t))
                if client.our_state is h11.DONE and client.their_state is h11.DONE:
                    client.start_next_cycle()
                else:
                    break
        return sorted(out, key=lambda e: e.started)


if __name__ == "__main__":
    import sys

    def _stop(*_):
        raise KeyboardInterrupt          # a background job ignores SIGINT: stop cleanly on SIGTERM too
    signal.signal(signal.SIGTERM, _stop)
    with running_sogo() as s:
        print(f"SOGo ActiveSync at {s.url}/Microsoft-Server-ActiveSync (started in {s.startup_seconds:.1f} s); "
              f"IMAP 127.0.0.1:{s.imap_port}; users {USERS}; files in {s.base}", flush=True)
        if "--check" not in sys.argv:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
