"""The Sync Settings policy: hide folder classes (calendar, contacts, tasks, notes).

EAS names folders by opaque ServerIds; only the FolderSync answer says which class
each one is (its ``Type``). So the gateway learns ServerId -> Type from every
FolderSync answer it carries (``FolderRegistry``, shared by the workers through the
store), removes the hidden folders (and anything under them) from that answer, and
refuses Sync, Ping and GetItemEstimate requests that name a hidden folder.
"""
from __future__ import annotations

import msgspec

from seg_fast.policy.model import device_key

_FH = "FolderHierarchy:"
_CHANGE_TAGS = (_FH + "Add", _FH + "Update", _FH + "Delete")
# Request elements that name a folder, per command.
_FOLDER_REF_TAGS = frozenset({"AirSync:CollectionId", "GetItemEstimate:CollectionId", "Ping:Id"})

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(dict[str, int])


class FolderRegistry:
    """Per device: ServerId -> FolderSync Type, as seen in FolderSync answers."""

    def __init__(self):
        self.by_device: dict[str, dict[str, int]] = {}
        self._learned: set[str] = set()

    def folders(self, key: str) -> dict[str, int]:
        return self.by_device.get(key, {})

    def hidden(self, key: str, hidden_types: frozenset[int]) -> set[str]:
        return {sid for sid, t in self.folders(key).items() if t in hidden_types}

    def learn(self, key: str, added: dict[str, int], removed: list[str]) -> None:
        cur = self.by_device.setdefault(key, {})
        before = dict(cur)
        cur.update(added)
        for sid in removed:
            cur.pop(sid, None)
        if cur != before:
            self._learned.add(key)

    def reset(self, key: str) -> None:
        if self.by_device.pop(key, None):
            self._learned.add(key)

    def take_learned(self) -> dict[str, bytes]:
        """What changed since the last call, to be written to the store."""
        out = {k: _enc.encode(self.by_device.get(k, {})) for k in self._learned}
        self._learned = set()
        return out

    def load(self, entries: dict[str, bytes]) -> None:
        for k, raw in entries.items():
            try:
                self.by_device[k] = _dec.decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue


class FolderSyncFilter:
    """Answer transform: learn folder classes, drop the hidden ones, fix Count."""

    commands = frozenset({"FolderSync"})

    def __init__(self, hidden_types: frozenset[int], registry: FolderRegistry):
        self.hidden_types = hidden_types
        self.registry = registry

    def transform_answer(self, req, status, headers, body: bytes) -> bytes:
        from seg_fast.eas.wbxml import decode, encode

        if status != 200 or not body or not req.device_id:
            return body
        root = decode(body)
        changes = root.find(_FH + "Changes")
        if root.tag != _FH + "FolderSync" or changes is None:
            return body
        key = device_key(req.device_id)
        if (root.findtext(_FH + "SyncKey") or "") == "0":
            self.registry.reset(key)   # SyncKey 0 answers list every folder afresh
        known = dict(self.registry.folders(key))
        added: dict[str, int] = {}
        removed: list[str] = []
        parents: dict[str, str] = {}
        for ch in changes.children:
            if ch.tag in (_FH + "Add", _FH + "Update"):
                sid = ch.findtext(_FH + "ServerId") or ""
                try:
                    added[sid] = int(ch.findtext(_FH + "Type") or "0")
                except ValueError:
                    added[sid] = 0
                parents[sid] = ch.findtext(_FH + "ParentId") or "0"
            elif ch.tag == _FH + "Delete":
                removed.append(ch.findtext(_FH + "ServerId") or "")
        folders = {**known, **added}

        def effective(sid: str) -> int:
            # A folder under a hidden folder is hidden too (the device could not place
            # it): it is remembered with its hidden ancestor's class.
            seen, cur = set(), sid
            while cur in folders and cur not in seen:
                if folders[cur] in self.hidden_types:
                    return folders[cur]
                seen.add(cur)
                cur = parents.get(cur, "0")
            return folders.get(sid, 0)
        learned = {sid: effective(sid) for sid in added}
        self.registry.learn(key, learned, removed)
        hidden = {sid for sid, t in {**known, **learned}.items() if t in self.hidden_types}
        kept, dropped = [], 0
        for ch in changes.children:
            if ch.tag in _CHANGE_TAGS and (ch.findtext(_FH + "ServerId") or "") in hidden:
                dropped += 1
                continue
            kept.append(ch)
        if not dropped:
            return body
        changes.children = kept
        count = changes.find(_FH + "Count")
        if count is not None:
            count.text = str(sum(1 for ch in kept if ch.tag in _CHANGE_TAGS))
        return encode(root)


class HiddenFolderGuard:
    """Request transform: refuse a request that names a hidden folder."""

    commands = frozenset({"Sync", "Ping", "GetItemEstimate"})

    def __init__(self, hidden_types: frozenset[int], registry: FolderRegistry):
        self.hidden_types = hidden_types
        self.registry = registry

    def transform_request(self, req, body: bytes) -> bytes | None:
        from seg_fast.eas.wbxml import decode

        if not body or not req.device_id:
            return body
        hidden = self.registry.hidden(device_key(req.device_id), self.hidden_types)
        if not hidden:
            return body
        for el in decode(body).iter():
            if el.tag in _FOLDER_REF_TAGS and el.text in hidden:
                return None
        return body


def sync_settings_transforms(hidden_types: frozenset[int], registry: FolderRegistry) -> tuple:
    return (FolderSyncFilter(hidden_types, registry), HiddenFolderGuard(hidden_types, registry))
