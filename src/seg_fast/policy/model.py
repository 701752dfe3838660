"""Policy documents and device records: the data every decision is made on.

Two kinds of data, stored and updated separately:
- ``PolicyDocument``: the compliance policies, the gateway switches and the email
  security document; replaced whole (load, full pull) and versioned.
- ``DeviceRecord``: what the MDM knows about one device (managed, compliant,
  compromised ...) plus its override; changed one at a time (push, delta, admin).
``DeviceSighting`` is what the gateway itself observed (device discovery).

Every document is strict: unknown fields and wrong types are rejected whole with
a ``PolicyError`` naming the key, so a malformed update never replaces a good one.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from seg_fast.content.model import EmailSecurityPolicy
from seg_fast.errors import PolicyError

_STRICT = dict(kw_only=True, forbid_unknown_fields=True, frozen=True)

# EAS folder classes the Sync Settings policy can hide, and the FolderSync Type
# values (MS-ASCMD 2.2.3.186.3) that belong to each: default and user-created.
FOLDER_CLASSES: dict[str, frozenset[int]] = {
    "tasks": frozenset({7, 15}),
    "calendar": frozenset({8, 13}),
    "contacts": frozenset({9, 14}),
    "notes": frozenset({10, 17}),
}
FolderClass = Literal["calendar", "contacts", "tasks", "notes"]

# EAS commands (MS-ASCMD names) the command switches may turn off.
EAS_COMMANDS = frozenset({
    "Sync", "SendMail", "SmartForward", "SmartReply", "GetAttachment", "GetHierarchy",
    "CreateCollection", "DeleteCollection", "MoveCollection", "FolderSync", "FolderCreate",
    "FolderDelete", "FolderUpdate", "MoveItems", "GetItemEstimate", "MeetingResponse",
    "Search", "Settings", "Ping", "ItemOperations", "Provision", "ResolveRecipients",
    "ValidateCert", "Find",
})
# Without these a device cannot work at all; turning one off is almost surely a mistake
# but the guide allows it ("required transactions"), so it is allowed and reported.
REQUIRED_COMMANDS = frozenset({"Provision", "FolderSync", "Sync", "Ping", "Settings"})

Days = Annotated[int, msgspec.Meta(ge=1, le=32767)]


class ListPolicy(msgspec.Struct, **_STRICT):
    """An allow list or a block list of names (compared case-insensitively).

    For the mail client policy an entry holding ``*`` or ``?`` is a shell-style
    pattern; every other entry matches exactly.
    """
    enabled: bool = False
    mode: Literal["allow", "block"] = "allow"
    values: list[str] = []


class SyncSettingsPolicy(msgspec.Struct, **_STRICT):
    """Hide these folder classes from FolderSync answers and refuse Sync of them."""
    enabled: bool = False
    blocked_classes: list[FolderClass] = []


class GeneralAccess(msgspec.Struct, **_STRICT):
    managed_device_only: bool = False
    device_type: ListPolicy = ListPolicy()
    mail_client: ListPolicy = ListPolicy()
    user: ListPolicy = ListPolicy()
    sync_settings: SyncSettingsPolicy = SyncSettingsPolicy()


class InactivityPolicy(msgspec.Struct, **_STRICT):
    enabled: bool = False
    days: Days = 30


class PlatformSets(msgspec.Struct, **_STRICT):
    """Per platform, the allowed values (models or OS versions); a platform not
    listed is not restricted. Values are exact, or ``*`` patterns ("17.*")."""
    enabled: bool = False
    allowed: dict[str, list[str]] = {}


class ManagedDevicePolicies(msgspec.Struct, **_STRICT):
    """Apply to managed devices only (an unmanaged device has no MDM data)."""
    inactivity: InactivityPolicy = InactivityPolicy()
    compromised: bool = False          # block devices that reported compromised
    encryption: bool = False           # block devices that reported not encrypted
    mdm_compliant: bool = False        # block devices the MDM marks non-compliant
    model: PlatformSets = PlatformSets()
    os: PlatformSets = PlatformSets()
    require_eas_profile: bool = False


class GatewayPolicy(msgspec.Struct, **_STRICT):
    """Gateway-wide switches that travel with the policies (the dashboard sets them)."""
    test_mode: bool = False
    # Commands refused through the gateway ("required/optional transactions" off).
    disabled_commands: list[str] = []


class PolicyDocument(msgspec.Struct, **_STRICT):
    """Everything but the device records: one document, replaced whole."""
    general: GeneralAccess = GeneralAccess()
    managed: ManagedDevicePolicies = ManagedDevicePolicies()
    gateway: GatewayPolicy = GatewayPolicy()
    security: EmailSecurityPolicy | None = None


Override = Literal["default", "whitelist", "blacklist"]


class DeviceRecord(msgspec.Struct, **_STRICT, gc=False):
    """What the MDM reports about one device, keyed by EAS DeviceId.

    ``None`` means "not reported": the compromised and encryption policies only
    act on devices that reported (as the guide says). Scalars only, so never in a
    reference cycle: not tracked by the collector (every worker holds every record).
    """
    device_id: str
    user: str = ""                     # empty: any user; else the enrolled user
    managed: bool = False
    compliant: bool | None = None
    compromised: bool | None = None
    encrypted: bool | None = None
    platform: str = ""
    model: str = ""
    os: str = ""
    last_checkin: float = 0.0          # Unix time of the last MDM check-in; 0: never
    eas_profile: bool = False
    key_id: str = ""                   # device-user attachment key id
    override: Override = "default"


class DeviceSighting(msgspec.Struct, kw_only=True):
    """What the gateway itself saw of one device (device discovery)."""
    device_id: str
    user: str = ""
    device_type: str = ""
    mail_client: str = ""
    ip: str = ""
    node: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    last_command: str = ""
    status: str = ""                   # "allowed" | "blocked" | "test_mode"
    reason: str = ""
    http_status: int = 0


class PolicyFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The file/API form: the document plus any number of device records."""
    policies: PolicyDocument = PolicyDocument()
    devices: list[DeviceRecord] = []


class DeviceDelta(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One delta page of the policy API: changed and removed devices since a token."""
    token: str
    policies: PolicyDocument | None = None
    devices: list[DeviceRecord] = []
    removed: list[str] = []


def device_key(device_id: str) -> str:
    """Device ids are compared case-insensitively (clients vary in case)."""
    return device_id.lower()


def check_document(doc: PolicyDocument) -> PolicyDocument:
    """Semantic checks msgspec cannot express; raise PolicyError naming the key."""
    unknown = sorted(set(doc.gateway.disabled_commands) - EAS_COMMANDS)
    if unknown:
        raise PolicyError(f"gateway.disabled_commands: unknown EAS command {unknown[0]!r}")
    for name, lp in (("device_type", doc.general.device_type), ("mail_client", doc.general.mail_client),
                     ("user", doc.general.user)):
        if lp.enabled and lp.mode == "allow" and not lp.values:
            # An empty allow list blocks everyone: almost surely a broken export.
            raise PolicyError(f"general.{name}: an enabled allow list must not be empty")
    return doc


def decode_json(raw: bytes | str, type, what: str):
    """Decode one JSON document into ``type``; any error is a PolicyError naming ``what``."""
    try:
        return msgspec.json.decode(raw, type=type)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PolicyError(f"{what}: not valid JSON: {exc}") from None


def decode_policy_file(raw: bytes | str, *, what: str = "policy document") -> PolicyFile:
    """Decode a JSON policy file (document + devices); reject it whole on any error."""
    pf = decode_json(raw, PolicyFile, what)
    check_document(pf.policies)
    check_devices(pf.devices, what)
    return pf


def decode_document(raw: bytes | str, *, what: str = "policy document") -> PolicyDocument:
    return check_document(decode_json(raw, PolicyDocument, what))


def decode_device(raw: bytes | str, *, what: str = "device record") -> DeviceRecord:
    rec = decode_json(raw, DeviceRecord, what)
    check_devices([rec], what)
    return rec


def decode_delta(raw: bytes | str, *, what: str = "policy delta") -> DeviceDelta:
    delta = decode_json(raw, DeviceDelta, what)
    if delta.policies is not None:
        check_document(delta.policies)
    check_devices(delta.devices, what)
    return delta


def check_devices(devices: list[DeviceRecord], what: str) -> None:
    for i, rec in enumerate(devices):
        if not rec.device_id or len(rec.device_id) > 128:
            raise PolicyError(f"{what}: devices[{i}].device_id must be 1-128 characters")
