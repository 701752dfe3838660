"""The simulated mailboxes: folders, items and per-device sync state (sans-IO).

Kept small per device because the sizing benchmark holds tens of thousands of
them: slotted objects, item ids as short strings, a sync state per collection
that a device actually synchronised.
"""
from __future__ import annotations

# (ServerId, DisplayName, FolderHierarchy Type, Ping/Sync class)
FOLDERS: tuple[tuple[str, str, int, str], ...] = (
    ("1", "Inbox", 2, "Email"),
    ("2", "Drafts", 3, "Email"),
    ("3", "Deleted Items", 4, "Email"),
    ("4", "Sent Items", 5, "Email"),
    ("5", "Outbox", 6, "Email"),
    ("6", "Calendar", 8, "Calendar"),
    ("7", "Contacts", 9, "Contacts"),
    ("8", "Tasks", 7, "Tasks"),
    ("9", "Notes", 10, "Notes"),
)
INBOX, DRAFTS, DELETED, SENT = "1", "2", "3", "4"
FOLDER_IDS = frozenset(f[0] for f in FOLDERS)


def normalize_user(user: str) -> str:
    """``DOMAIN\\jdoe``, ``jdoe@example.com`` and ``JDoe`` are one mailbox."""
    user = user.rsplit("\\", 1)[-1]
    return user.split("@", 1)[0].lower()


class Item:
    __slots__ = ("msg", "read")

    def __init__(self, msg: int):
        self.msg = msg          # corpus index
        self.read = False


class SyncState:
    """One device's view of one collection: its SyncKey and the ServerIds it holds.
    The previous key and set are kept so a retried request (lost answer) works."""
    __slots__ = ("key", "known", "prev_key", "prev_known")

    def __init__(self) -> None:
        self.key = 1
        self.known: set[str] = set()
        self.prev_key = 0
        self.prev_known: set[str] = set()


class Device:
    __slots__ = ("id", "temp_key", "policy_key", "heartbeat", "ping_folders", "ping_body", "folder_key",
                 "sync", "last_sync", "parked", "search")

    def __init__(self, device_id: str):
        self.id = device_id
        self.temp_key: str | None = None
        self.policy_key: str | None = None
        self.heartbeat: int | None = None
        self.ping_folders: tuple[str, ...] = ()
        self.ping_body: bytes | None = None  # the last Ping body read whole: heartbeat and folders from it
        self.folder_key = 0
        self.sync: dict[str, SyncState] = {}
        self.last_sync = None          # the last non-empty Sync request (for empty Syncs)
        self.parked = None             # the Ping parked for this device, if any
        self.search = None             # (criteria, ServerIds): the last mailbox Search's results


class Mailbox:
    __slots__ = ("user", "folders", "next_id", "devices")

    def __init__(self, user: str):
        self.user = user
        # Folder id -> its items, created on first use (most folders stay empty).
        self.folders: dict[str, dict[str, Item]] = {}
        self.next_id = 1
        self.devices: dict[str, Device] = {}

    def device(self, device_id: str) -> Device:
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = Device(device_id)
        return dev

    def folder(self, fid: str) -> dict[str, Item]:
        items = self.folders.get(fid)
        if items is None:
            items = self.folders[fid] = {}
        return items

    def add(self, folder: str, item: Item) -> str:
        sid = f"{folder}:{self.next_id}"
        self.next_id += 1
        self.folder(folder)[sid] = item
        return sid

    def find(self, server_id: str) -> tuple[str, Item] | None:
        folder = server_id.partition(":")[0]
        items = self.folders.get(folder)
        item = items.get(server_id) if items is not None else None
        return None if item is None else (folder, item)

    def move(self, server_id: str, dst: str) -> str | None:
        found = self.find(server_id)
        if found is None:
            return None
        folder, item = found
        del self.folders[folder][server_id]
        return self.add(dst, item)

    def pending(self, dev: Device, folder: str) -> bool:
        """Does ``folder`` hold changes the device has not synchronised?"""
        items = self.folders.get(folder, {})
        st = dev.sync.get(folder)
        if st is None:
            return bool(items)
        return len(items) != len(st.known) or not items.keys() <= st.known
