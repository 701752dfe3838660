"""The decision: may this request reach the mail server? Pure and sans-IO.

``evaluate(req, device, policies, now)`` is the whole rule book: a pure function
of the request, the device's MDM record and the compiled policies. ``Engine``
puts a per-device cache in front of it so that the request path costs a dict
lookup and three string compares; the cache is dropped whole when the policy
document changes and per device when one device record changes.
"""
from __future__ import annotations

import fnmatch
import re
import time
from typing import Callable, Iterable

from seg_fast.eas.credentials import NONE as NO_CREDENTIAL_USER
from seg_fast.hooks import Decision
from seg_fast.policy.model import (
    FOLDER_CLASSES, DeviceRecord, ListPolicy, PlatformSets, PolicyDocument, device_key,
)
from seg_fast.policy.records import RecordTable, Records, Shared, record_key

# Stable reason codes (a dashboard shows them; the OpenAPI document lists them).
NO_POLICIES_BLOCKED = "blocked.no_policies"
NO_POLICIES_ALLOWED = "allowed.no_policies"
COMMAND_DISABLED = "blocked.command_disabled"
BLACKLISTED = "blocked.blacklisted"
WHITELISTED = "allowed.whitelisted"
USER = "blocked.user"
USER_UNVERIFIED = "blocked.user_unverified"   # the credential names no user; the decision needs one
DEVICE_TYPE = "blocked.device_type"
MAIL_CLIENT = "blocked.mail_client"
UNMANAGED = "blocked.unmanaged"
INACTIVE = "blocked.mdm_inactive"
COMPROMISED = "blocked.device_compromised"
NOT_ENCRYPTED = "blocked.device_not_encrypted"
NONCOMPLIANT = "blocked.mdm_noncompliant"
MODEL = "blocked.device_model"
OS = "blocked.device_os"
NO_EAS_PROFILE = "blocked.no_eas_profile"
COMPLIANT = "allowed.compliant"

REASONS = (NO_POLICIES_BLOCKED, NO_POLICIES_ALLOWED, COMMAND_DISABLED, BLACKLISTED, WHITELISTED,
           USER, USER_UNVERIFIED, DEVICE_TYPE, MAIL_CLIENT, UNMANAGED, INACTIVE, COMPROMISED, NOT_ENCRYPTED,
           NONCOMPLIANT, MODEL, OS, NO_EAS_PROFILE, COMPLIANT)

FOREVER = float("inf")
DAY = 86400.0
def user_forms(user: str | None) -> tuple[str, ...]:
    """The names a user list entry may match: full, without DOMAIN\\, without @domain."""
    u = (user or "").lower()
    forms = [u]
    if "\\" in u:
        u = u.rsplit("\\", 1)[1]
        forms.append(u)
    if "@" in u:
        forms.append(u.split("@", 1)[0])
    return tuple(forms)


def same_user(enrolled: str, user: str | None) -> bool:
    """Whether the request's user is the one the device is enrolled to ("" = anyone)."""
    return not enrolled or user_forms(enrolled)[-1] == user_forms(user)[-1]


# Stands for "a device enrolled to another user that is blacklisted": it is
# unmanaged for this user, and the blacklist still holds.
_FOREIGN_BLACKLISTED = DeviceRecord(device_id="-", override="blacklist")


def device_for(record: DeviceRecord | None, user: str | None) -> DeviceRecord | None:
    """The record that applies to this user's request. A device enrolled to another
    user is unknown (unmanaged) for this one: another user never inherits its managed
    status or its whitelisting, but a blacklisted device stays blocked for everyone."""
    if record is None or same_user(record.user, user):
        return record
    return _FOREIGN_BLACKLISTED if record.override == "blacklist" else None


class NameMatcher:
    """Case-insensitive exact names plus optional ``*``/``?`` patterns."""

    __slots__ = ("exact", "pattern")

    def __init__(self, values: Iterable[str], *, patterns: bool):
        exact, pats = set(), []
        for v in values:
            v = v.strip().lower()
            if patterns and ("*" in v or "?" in v):
                pats.append(fnmatch.translate(v))
            else:
                exact.add(v)
        self.exact = frozenset(exact)
        self.pattern = re.compile("|".join(pats), re.S) if pats else None

    def match(self, name: str) -> bool:
        name = name.lower()
        if name in self.exact:
            return True
        return self.pattern is not None and self.pattern.match(name) is not None


class _List:
    """A compiled ListPolicy: ``passes(names)`` is the whole policy."""

    __slots__ = ("allow", "matcher")

    def __init__(self, lp: ListPolicy, *, patterns: bool = False):
        self.allow = lp.mode == "allow"
        self.matcher = NameMatcher(lp.values, patterns=patterns)

    def passes(self, *names: str) -> bool:
        match = self.matcher.match
        for n in names:
            if match(n):
                return self.allow
        return not self.allow


class _PerPlatform:
    __slots__ = ("by_platform",)

    def __init__(self, ps: PlatformSets):
        self.by_platform = {p.lower(): NameMatcher(v, patterns=True) for p, v in ps.allowed.items()}

    def passes(self, platform: str, value: str) -> bool:
        m = self.by_platform.get(platform.lower())
        return m is None or m.match(value)


class CompiledPolicies:
    """A PolicyDocument turned into matchers; ``None`` fields are policies that are off."""

    def __init__(self, doc: PolicyDocument):
        g, m = doc.general, doc.managed
        self.doc = doc
        self.managed_only = g.managed_device_only
        self.user = _List(g.user) if g.user.enabled else None
        self.device_type = _List(g.device_type) if g.device_type.enabled else None
        self.mail_client = _List(g.mail_client, patterns=True) if g.mail_client.enabled else None
        self.hidden_types = frozenset().union(
            *(FOLDER_CLASSES[c] for c in g.sync_settings.blocked_classes)) if g.sync_settings.enabled else frozenset()
        self.inactive_after = m.inactivity.days * DAY if m.inactivity.enabled else None
        self.compromised = m.compromised
        self.encryption = m.encryption
        self.mdm_compliant = m.mdm_compliant
        self.model = _PerPlatform(m.model) if m.model.enabled else None
        self.os = _PerPlatform(m.os) if m.os.enabled else None
        self.require_eas_profile = m.require_eas_profile
        self.disabled_commands = frozenset(doc.gateway.disabled_commands)
        self.test_mode = doc.gateway.test_mode


def evaluate(req, device: DeviceRecord | None, pol: CompiledPolicies, now: float) -> tuple[str, float]:
    """The rule book. Returns (reason code, time until which the answer holds).

    ``device`` is the MDM record for the request's DeviceId, or None for a device
    the MDM does not know (or knows enrolled to another user): it is unmanaged.
    The command switches are checked by the caller (they do not depend on the device).
    """
    if device is not None:
        if device.override == "blacklist":
            return BLACKLISTED, FOREVER
        if device.override == "whitelist":
            return WHITELISTED, FOREVER
    if pol.user is not None and not pol.user.passes(*user_forms(req.user)):
        return USER, FOREVER
    if pol.device_type is not None and not pol.device_type.passes(req.device_type or ""):
        return DEVICE_TYPE, FOREVER
    if pol.mail_client is not None and not pol.mail_client.passes(req.user_agent or ""):
        return MAIL_CLIENT, FOREVER
    managed = device is not None and device.managed
    if not managed:
        return (UNMANAGED, FOREVER) if pol.managed_only else (COMPLIANT, FOREVER)
    until = FOREVER
    if pol.inactive_after is not None:
        until = device.last_checkin + pol.inactive_after
        if device.last_checkin <= 0 or now >= until:
            return INACTIVE, FOREVER
    if pol.compromised and device.compromised:
        return COMPROMISED, FOREVER
    if pol.encryption and device.encrypted is False:
        return NOT_ENCRYPTED, FOREVER
    if pol.mdm_compliant and device.compliant is False:
        return NONCOMPLIANT, FOREVER
    if pol.model is not None and not pol.model.passes(device.platform, device.model):
        return MODEL, FOREVER
    if pol.os is not None and not pol.os.passes(device.platform, device.os):
        return OS, FOREVER
    if pol.require_eas_profile and not device.eas_profile:
        return NO_EAS_PROFILE, FOREVER
    return COMPLIANT, until


TransformsFor = Callable[..., tuple]


def _default_transforms_for():
    from seg_fast.content.pipeline import transforms_for
    return transforms_for


def _default_no_policy_transforms():
    from seg_fast.content import pipeline
    return getattr(pipeline, "no_policy_transforms", lambda **kw: ())


class Engine:
    """Decisions for one worker: the compiled snapshot plus the per-device cache."""

    # Past this many cached devices the cache starts over (random DeviceIds must
    # not grow memory without bound).
    MAX_CACHED = 250_000

    def __init__(self, *, allow_if_no_policies: bool = False, test_mode: bool = False,
                 transforms_for: TransformsFor | None = None, sync_transforms: Callable | None = None,
                 no_policy_transforms: Callable | None = None, clock: Callable[[], float] = time.time,
                 user_without_credential: str = "trust_query"):
        self.allow_if_no_policies = allow_if_no_policies
        # policy.user_without_credential (the gatekeeper passes the config's, "refuse" by default).
        self.refuse_unverified = user_without_credential == "refuse"
        self.config_test_mode = test_mode
        self._transforms_for = transforms_for or _default_transforms_for()
        # What devices get while no policy document is loaded and allow_if_no_policies is on
        # (the guide's "Block Attachments" when the local policy set is empty).
        self._no_policy_transforms = no_policy_transforms or (
            (lambda **kw: ()) if transforms_for is not None else _default_no_policy_transforms())
        # sync_transforms(hidden_types) -> tuple of Transform/RequestTransform (Sync Settings).
        self._sync_transforms = sync_transforms
        self._clock = clock
        self.now = clock()
        self.version = 0
        self.policies: CompiledPolicies | None = None
        self._shared = Shared()
        self.devices = Records(RecordTable.of(()), self._shared)
        self._cache: dict[str, tuple] = {}
        # device_key -> the raw id (or a set of them) its cache entries are under, for ids
        # not already in key form; a raw id equal to its key is its own entry.
        self._aliases: dict[str, str | set[str]] = {}
        self._rebuild()

    # -- snapshot updates -------------------------------------------------------
    def load(self, doc: PolicyDocument | None, devices: RecordTable | Iterable[DeviceRecord], version: int) -> None:
        table = devices if isinstance(devices, RecordTable) else RecordTable.of(devices)
        self.devices = Records(table, self._shared)
        self.set_document(doc, version)

    def set_document(self, doc: PolicyDocument | None, version: int) -> None:
        self.policies = CompiledPolicies(doc) if doc is not None else None
        self.version = version
        self._rebuild()

    def put_device(self, rec: DeviceRecord, version: int | None = None) -> None:
        key = record_key(rec.device_id)
        self.devices.put(key, rec)
        self._forget(key)
        if version is not None:
            self.version = version

    def remove_device(self, device_id: str, version: int | None = None) -> None:
        key = device_key(device_id)
        self.devices.remove(key)
        self._forget(key)
        if version is not None:
            self.version = version

    def set_test_mode(self, on: bool) -> None:
        self.config_test_mode = on
        self._rebuild()

    @property
    def test_mode(self) -> bool:
        return self.config_test_mode or (self.policies is not None and self.policies.test_mode)

    def _forget(self, key: str) -> None:
        self._cache.pop(key, None)
        raws = self._aliases.pop(key, ())
        for raw in ((raws,) if type(raws) is str else raws):
            self._cache.pop(raw, None)

    def _rebuild(self) -> None:
        self._cache = {}
        self._aliases = {}
        # One Decision per (reason, test mode) for devices whose transforms are none: with
        # no email security, every allowed device's (one object, not one per device).
        self._plain: dict[tuple[str, bool], Decision] = {}
        pol = self.policies
        tm = self.test_mode
        self._blocked = {r: self._make(False, r, (), tm) for r in REASONS if r.startswith("blocked.")}
        self._disabled = pol.disabled_commands if pol is not None else frozenset()
        self._cmd_decision = self._blocked[COMMAND_DISABLED]
        # Without a document every device is blocked alike (one shared answer); when
        # allowed, each device still gets its own no-policy transforms (cached below).
        self._fixed = self._blocked[NO_POLICIES_BLOCKED] if pol is None and not self.allow_if_no_policies else None
        self._sync = (self._sync_transforms(pol.hidden_types)
                      if pol is not None and pol.hidden_types and self._sync_transforms else ())

    @staticmethod
    def _make(allowed: bool, reason: str, transforms: tuple, test_mode: bool) -> Decision:
        if not allowed and test_mode:
            # Test mode: decide and record, never block.
            return Decision(allowed=True, reason=reason, transforms=transforms, test_mode=True)
        return Decision(allowed=allowed, reason=reason, transforms=transforms)

    # -- the request path -------------------------------------------------------
    def tick(self) -> None:
        """Advance the engine's clock (the worker calls it every TICK seconds): cached
        decisions that expire (MDM inactivity) are compared against it, not a syscall."""
        self.now = self._clock()

    def decide(self, req) -> Decision:
        e = self._cache.get(req.device_id)
        if (e is not None and e[0] == req.user and e[1] == req.device_type and e[2] == req.user_agent
                and e[4] > self.now and e[5] == req.identity):
            if req.command in self._disabled:
                return self._cmd_decision
            return e[3]
        return self._miss(req, req.device_id)

    def _miss(self, req, raw) -> Decision:
        if self._fixed is not None:
            return self._fixed
        if req.command in self._disabled:
            return self._cmd_decision
        self.now = self._clock()
        pol = self.policies
        key = device_key(raw or "")
        record = self.devices.get(key)
        device = device_for(record, req.user)
        managed = device is not None and device.managed
        if pol is None:     # no document, allow_if_no_policies on
            reason, until = NO_POLICIES_ALLOWED, FOREVER
            decision = Decision(allowed=True, reason=reason, transforms=tuple(self._no_policy_transforms(
                managed=managed, device_id=raw or "", user=req.user or "")))
        else:
            if self._unverified(req, record, pol):
                reason, until = USER_UNVERIFIED, FOREVER
            else:
                reason, until = evaluate(req, device, pol, self.now)
            decision = self._blocked.get(reason)
            if decision is None or decision.test_mode:
                # Allowed (or let through by test mode): this device's own transforms.
                content = self._transforms_for(pol.doc.security, managed=managed,
                                               device_id=raw or "", user=req.user or "")
                transforms = self._sync + tuple(content)
                tm = decision is not None
                if transforms:
                    decision = Decision(allowed=True, reason=reason, transforms=transforms, test_mode=tm)
                else:
                    decision = self._plain.get((reason, tm))
                    if decision is None:
                        decision = self._plain[(reason, tm)] = Decision(allowed=True, reason=reason, test_mode=tm)
        if raw is not None:
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
                self._aliases.clear()
            shared = self._shared
            self._cache[raw] = (req.user, shared(req.device_type), shared(req.user_agent), decision, until,
                                req.identity)
            if raw != key:
                had = self._aliases.get(key)
                if had is None:
                    self._aliases[key] = raw
                elif type(had) is str:
                    if had != raw:
                        self._aliases[key] = {had, raw}
                else:
                    had.add(raw)
        return decision

    def _unverified(self, req, record: DeviceRecord | None, pol: CompiledPolicies) -> bool:
        """Whether to refuse a request decided on an unverified User= (policy.user_without_credential):
        the credential names no user, and the answer depends on who it is (the user policy,
        or a device record enrolled to a user). An NTLM type-1 (identity "handshake") is
        decided on User=: the mail server answers it with a challenge, never with mail."""
        if not self.refuse_unverified or req.identity != NO_CREDENTIAL_USER:
            return False
        if record is not None:
            if record.override == "blacklist":
                return False               # blocked whoever it is
            if record.user:
                return True                # enrolled: only its user gets its managed status
            if record.override == "whitelist":
                return False               # allowed whoever it is
        return pol.user is not None

    def explain(self, req) -> tuple[str, DeviceRecord | None]:
        """The uncached reason for a request (admin lookups, run compliance)."""
        if self.policies is None:
            return (NO_POLICIES_ALLOWED if self.allow_if_no_policies else NO_POLICIES_BLOCKED), None
        if req.command in self._disabled:
            return COMMAND_DISABLED, None
        device = self.devices.get(device_key(req.device_id or ""))
        device = device_for(device, req.user)
        return evaluate(req, device, self.policies, self._clock())[0], device
