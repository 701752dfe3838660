"""Fuzzing a live EAS endpoint: generate, send, classify, shrink, record, replay.

``Fuzzer(target, device)`` speaks to one endpoint over one keep-alive trio + h11
connection (sim/client.py's EasClient). ``setup()`` provisions and reads the
folder hierarchy and the Inbox, so generated requests use ids the mailbox has;
``run()`` drives hypothesis in a worker thread (each example is sent from there
through trio.from_thread), classifies every answer (classify.py) and, for each
failure, lets hypothesis shrink it and writes the smallest example found as a
JSON failure file. ``replay(path)`` sends a failure file's request again.
"""
from __future__ import annotations

import hashlib
import ssl
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec
import trio
from hypothesis import HealthCheck, Phase, Verbosity, given, seed as hseed, settings, strategies as st

from seg_fast.eas.wbxml import Element, decode, to_xml
from seg_fast.errors import WBXMLError
from seg_fast.sim.client import EasClient
from seg_fast.sim.tree import E, find, kids, text
from seg_fast.testing import spec
from seg_fast.testing.classify import Answer, Verdict, answer_document, classify, classify_error
from seg_fast.testing.mutators import mutated
from seg_fast.testing.requests import Known, commands_for, request
from seg_fast.testing.wire import Device, HttpRequest, build, query_params

FORMAT = "seg-fast-fuzz/1"
EMAIL_TYPES = {"2", "3", "4", "5", "6", "12"}      # FolderHierarchy Type of mail folders


class Target(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> "Target":
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target must be http(s)://HOST[:PORT][/PATH], not {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path or "/Microsoft-Server-ActiveSync")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


class Case(msgspec.Struct, kw_only=True):
    """What was drawn: enough to build the request again with a fresh policy key."""
    command: str
    version: str
    body: bytes                      # the WBXML (or MIME) sent, after mutation
    base64_query: bool = False
    multipart: bool = False
    params: dict[str, str] = {}
    ops: list[str] = []              # mutations applied ([] : a valid request)


class Failure(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    kind: str
    detail: str
    target: str
    case: Case
    request: HttpRequest             # exactly what was sent
    request_xml: str | None          # the body as XML, when it decodes
    answer: Answer | None
    answer_xml: str | None
    seconds: float


def body_xml(body: bytes) -> str | None:
    if body[:2] != b"\x03\x01":
        return None
    try:
        return to_xml(decode(body))
    except WBXMLError:
        return None


def _answer_xml(answer: Answer | None) -> str | None:
    if answer is None:
        return None
    try:
        doc = answer_document(answer)
    except Exception:
        return None
    return to_xml(doc) if doc is not None else None


def may_park(case: Case) -> bool:
    """Ping, and Sync with Wait/HeartbeatInterval, may legitimately wait for changes."""
    if case.command == "Ping":
        return True
    if case.command != "Sync" or case.body[:2] != b"\x03\x01":
        return False
    try:
        doc = decode(case.body)
    except WBXMLError:
        return False
    return any(el.tag in ("AirSync:Wait", "AirSync:HeartbeatInterval") for el in doc.iter())


class Fuzzer:
    def __init__(self, target: Target, device: Device = Device(), *, versions=("16.1",), commands=None,
                 deadline: float = 10.0, park_wait: float = 0.5, out: Path | None = None,
                 ssl_context: ssl.SSLContext | None = None, mutate: float = 0.5):
        self.target, self.device = target, device
        self.versions = tuple(versions)
        self.commands = tuple(commands) if commands else spec.COMMANDS
        self.deadline, self.park_wait = deadline, park_wait
        self.out = out
        self.mutate = mutate
        if target.scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self.client = EasClient(target.host, target.port, device.user, device.password, device.device_id,
                                device_type=device.device_type, version=self.versions[-1],
                                ssl_context=ssl_context, path=target.path, user_agent=device.user_agent)
        self.known = Known(user=device.user)
        self.executions = 0
        self.verdicts: dict[str, int] = {}
        self.http: dict[int, int] = {}          # answers per HTTP status (how much got past the parser)
        self.failures: dict[tuple[str, str], Failure] = {}   # (kind, command) -> the last (smallest) one
        self.written: list[Path] = []
        self._token: trio.lowlevel.TrioToken | None = None

    # -- one exchange ------------------------------------------------------------------
    def build(self, case: Case) -> HttpRequest:
        dev = msgspec.structs.replace(self.device, policy_key=self.client.policy_key)
        extra = [("ms-asacceptmultipart", "T")] if case.multipart else []
        req = build(case.command, None, version=case.version, device=dev, base64_query=case.base64_query,
                    params=case.params, host=f"{self.target.host}:{self.target.port}", path=self.target.path,
                    extra_headers=extra)
        is_wbxml = case.body[:2] == b"\x03\x01"
        headers = [h for h in req.headers if h[0] != "content-length"]
        headers += [("content-type", "application/vnd.ms-sync.wbxml" if is_wbxml else "message/rfc822"),
                    ("content-length", str(len(case.body)))]
        return msgspec.structs.replace(req, headers=headers, body=case.body)

    async def exchange(self, req: HttpRequest, parks: bool = False) -> tuple[Answer | None, Verdict, float]:
        t0 = time.monotonic()
        answer = None
        with trio.move_on_after(self.park_wait if parks else self.deadline) as scope:
            for attempt in (1, 2):
                reused = self.client._conn is not None
                try:
                    r = await self.client.send(req.method, req.target, list(req.headers), req.body)
                    answer = Answer(status=r.status, headers=list(r.headers.items()), body=r.body)
                    break
                except (ConnectionError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    await self.client.aclose()
                    # A kept-alive connection the server closed while idle is not this request's
                    # fault: once more on a new connection before calling it a reset.
                    if not reused or attempt == 2:
                        return None, classify_error(exc), time.monotonic() - t0
        if scope.cancelled_caught:
            await self.client.aclose()           # the connection is mid-request: start a new one
            return None, Verdict("parked") if parks else Verdict("hang", f"no answer in {self.deadline} s"), \
                time.monotonic() - t0
        return answer, classify(req.command, req.version, answer), time.monotonic() - t0

    async def run_case(self, case: Case) -> Failure | None:
        req = self.build(case)
        answer, verdict, seconds = await self.exchange(req, may_park(case))
        self.executions += 1
        self.verdicts[verdict.kind] = self.verdicts.get(verdict.kind, 0) + 1
        if answer is not None:
            self.http[answer.status] = self.http.get(answer.status, 0) + 1
        if answer is not None and _needs_provisioning(answer):
            await self.provision()
        if not verdict.failed:
            return None
        failure = Failure(kind=verdict.kind, detail=verdict.detail, target=self.target.url, case=case,
                          request=req, request_xml=body_xml(req.body), answer=answer,
                          answer_xml=_answer_xml(answer), seconds=round(seconds, 3))
        self.failures[(verdict.kind, case.command)] = failure
        return failure

    # -- set-up --------------------------------------------------------------------------
    async def provision(self) -> None:
        try:
            with trio.fail_after(self.deadline):
                await self.client.provision()
        except (ConnectionError, OSError, trio.TooSlowError, trio.BrokenResourceError):
            await self.client.aclose()
            self.client.policy_key = None       # a server without provisioning: go on without a key

    async def setup(self) -> Known:
        """Provision, then FolderSync and a first Inbox Sync: the ids the strategies use."""
        await self.provision()
        email, keys, sids, refs, contacts, fkey = [], {}, [], [], "7", "0"
        with trio.move_on_after(self.deadline * 3):
            r = await self.client.request("FolderSync", E("FolderHierarchy:FolderSync",
                                                          E("FolderHierarchy:SyncKey", "0")))
            doc = r.doc if r.status == 200 else None
            fkey = text(doc, "FolderHierarchy:SyncKey") or "0"
            for add in kids(find(doc, "FolderHierarchy:Changes"), "FolderHierarchy:Add"):
                ftype, sid = text(add, "FolderHierarchy:Type"), text(add, "FolderHierarchy:ServerId")
                if ftype in EMAIL_TYPES and sid:
                    email.append(sid)
                elif ftype == "9" and sid:
                    contacts = sid
            inbox = email[0] if email else "1"
            key = "0"
            for _ in range(2):
                r = await self.client.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
                    "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", inbox),
                    E("AirSync:WindowSize", 25) if key != "0" else None))))
                coll = find(r.doc if r.status == 200 else None, "AirSync:Collections", "AirSync:Collection")
                key = text(coll, "AirSync:SyncKey") or key
                for add in kids(find(coll, "AirSync:Commands"), "AirSync:Add"):
                    sid = text(add, "AirSync:ServerId")
                    if sid:
                        sids.append(sid)
                    for att in (find(add, "AirSync:ApplicationData", "AirSyncBase:Attachments").children
                                if find(add, "AirSync:ApplicationData", "AirSyncBase:Attachments") else []):
                        ref = text(att, "AirSyncBase:FileReference")
                        if ref:
                            refs.append(ref)
            if key != "0":
                keys[inbox] = key
        self.known = Known(email_folders=tuple(email) or ("1",), contacts_folder=contacts,
                           server_ids=tuple(sids) or ("1:1",), file_references=tuple(refs) or ("1:1:0",),
                           sync_keys=keys, folder_sync_key=fkey, user=self.device.user)
        return self.known

    # -- the hypothesis driver -------------------------------------------------------------
    def cases(self) -> st.SearchStrategy[Case]:
        known = self.known
        pairs = [(v, c) for v in self.versions for c in self.commands if c in commands_for(v)]
        # Built once: hypothesis works out a strategy's properties per object.
        valid = {(v, c): request(c, v, known) for v, c in pairs}
        broken = {(v, c): mutated(valid[v, c], v) for v, c in pairs}

        @st.composite
        def case(draw) -> Case:
            version, command = draw(st.sampled_from(pairs))
            doc, ops = (draw(broken[version, command]) if draw(st.floats(0, 1)) < self.mutate
                        else (draw(valid[version, command]), ()))
            body = doc if isinstance(doc, bytes) else _encode(doc)
            raw_mime = isinstance(doc, bytes) and doc[:2] != b"\x03\x01"
            params = query_params(command, doc, spec.vnum(version), known) if raw_mime else {}
            return Case(command=command, version=version, body=body, base64_query=draw(st.booleans()),
                        multipart=command == "ItemOperations" and draw(st.booleans()), params=params,
                        ops=list(ops))
        return case()

    async def run(self, max_examples: int = 100, seed: int | None = None, derandomize: bool = False) -> list[Path]:
        self._token = trio.lowlevel.current_trio_token()
        await trio.to_thread.run_sync(self._drive, max_examples, seed, derandomize)
        await self.client.aclose()
        return self.write_failures()

    def _drive(self, max_examples: int, seed: int | None, derandomize: bool) -> None:
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                  phases=[Phase.generate, Phase.shrink], report_multiple_bugs=True)
        @given(self.cases())
        def one(case: Case) -> None:
            failure = trio.from_thread.run(self.run_case, case, trio_token=self._token)
            if failure is not None:
                raise _failure_type(failure.kind, case.command)(failure.detail)

        if seed is not None and not derandomize:
            one = hseed(seed)(one)
        try:
            one()
        except FuzzFailure:
            pass            # each failure is in self.failures, shrunk as far as hypothesis got
        except BaseExceptionGroup as group:      # several failures, or one that did not reproduce (Flaky)
            rest = group.subgroup(lambda e: not isinstance(e, (FuzzFailure, BaseExceptionGroup)))
            if rest is not None:
                raise

    def write_failures(self) -> list[Path]:
        if self.out is None:
            return []
        self.out.mkdir(parents=True, exist_ok=True)
        for (kind, command), failure in sorted(self.failures.items()):
            data = msgspec.json.format(msgspec.json.encode(failure))
            digest = hashlib.sha256(data).hexdigest()[:10]
            path = self.out / f"{kind}-{command}-{digest}.json"
            path.write_bytes(data)
            self.written.append(path)
        return self.written


class FuzzFailure(AssertionError):
    """Raised inside hypothesis for a failed exchange; one subclass per (kind, command)
    so hypothesis shrinks each distinct failure on its own."""


_FAILURE_TYPES: dict[tuple[str, str], type] = {}


def _failure_type(kind: str, command: str) -> type:
    key = (kind, command)
    if key not in _FAILURE_TYPES:
        name = "".join(p.capitalize() for p in kind.split("-")) + command
        _FAILURE_TYPES[key] = type(name, (FuzzFailure,), {})
    return _FAILURE_TYPES[key]


def _encode(doc: Element) -> bytes:
    from seg_fast.eas.wbxml import encode
    return encode(doc)


def _needs_provisioning(answer: Answer) -> bool:
    if answer.status == 449:
        return True
    if answer.status != 200 or answer.body[:2] != b"\x03\x01":
        return False
    try:
        doc = decode(answer.body)
    except WBXMLError:
        return False
    return any(c.tag.endswith(":Status") and c.text in ("142", "143", "144") for c in doc.children)


def load_failure(path: Path) -> Failure:
    return msgspec.json.decode(Path(path).read_bytes(), type=Failure)


async def replay(failure: Failure, target: Target | None = None, device: Device = Device(), *,
                 verbatim: bool = False, deadline: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> tuple[Answer | None, Verdict]:
    """Send a failure's request again: rebuilt with a freshly provisioned policy key (default),
    or byte for byte as it was sent (``verbatim``)."""
    fz = Fuzzer(target or Target.parse(failure.target), device, versions=(failure.case.version,),
                deadline=deadline, park_wait=deadline, ssl_context=ssl_context)
    try:
        if verbatim:
            req = failure.request
        else:
            await fz.provision()
            req = fz.build(failure.case)
        answer, verdict, _ = await fz.exchange(req, may_park(failure.case))
        return answer, verdict
    finally:
        await fz.client.aclose()
