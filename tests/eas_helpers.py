"""What the end-to-end EAS tests share: the managed test device, its policy store, an Inbox Sync."""
from __future__ import annotations

import time
from pathlib import Path

from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.state import INBOX
from seg_fast.sim.tree import E


def managed_device() -> DeviceRecord:
    """jdoe's managed, compliant, encrypted iPhone MANAGED1, checked in a minute ago."""
    return DeviceRecord(device_id="MANAGED1", user="jdoe", managed=True, compliant=True, compromised=False,
                        encrypted=True, platform="Apple", model="iPhone 15", os="17.4",
                        last_checkin=time.time() - 60, eas_profile=True)


async def store_policies(path: Path, document: PolicyDocument, devices: list[DeviceRecord]) -> None:
    """A SQLite policy store at ``path`` holding ``document`` and ``devices`` (the gateway opens it)."""
    store = SqliteStore(path)
    await store.open()
    await store.replace_all(document, devices)
    await store.aclose()


def sync_req(key, body_type=None):
    """Inbox Sync: the first (key "0") bare; later ones get changes, 100 a window, and ask for
    ``body_type`` bodies when given."""
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", INBOX),
        E("AirSync:GetChanges") if key != "0" else None,
        E("AirSync:WindowSize", 100) if key != "0" else None,
        E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", body_type)))
        if body_type else None)))
