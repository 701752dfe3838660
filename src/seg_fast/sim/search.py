"""The simulator's Search command (MS-ASCMD 2.2.1.16), sans-IO.

Two stores:

- ``Mailbox`` (12.0+): the Query is an ``And`` (or a bare ``FreeText``) of
  ``FreeText`` (every word must be a whole word of the subject or the plain-text
  body, case-insensitive), ``AirSync:Class``, ``AirSync:CollectionId`` and
  ``GreaterThan``/``LessThan`` on ``Email:DateReceived``. Results are newest
  first; each carries Class, LongId, CollectionId and Properties (the Email fields,
  ``AirSyncBase:Attachments`` and an ``AirSyncBase:Body`` per BodyPreference, as
  Sync gives them). A device's last result set is kept and reused for the same
  query unless it sends ``RebuildResults`` (Exchange's search folder); there are no
  subfolders, so ``DeepTraversal`` changes nothing.
- ``GAL``: a fixed directory of 16 people; every word of the Query must begin a
  word of the name or alias (the address's local part).

``Range`` is ``m-n`` (default 0-99); more than 100 entries asked is Store Status 12,
a malformed one or a bad query Status 2, ``Or``/nested conditions Status 8.
No match: one empty ``Result`` and ``Total`` 0.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import NamedTuple

from seg_fast.sim.commands import Answer, Ctx, email_properties, long_id, wbxml
from seg_fast.sim.corpus import _FIRST, _LAST
from seg_fast.sim.state import FOLDER_IDS, FOLDERS
from seg_fast.sim.tree import E, Element, find, kids, text

MAX_RESULTS = 100                 # per answer, both stores (default Range 0-99)
EMAIL_FOLDERS = tuple(f[0] for f in FOLDERS if f[3] == "Email")
_WORD = re.compile(r"\w+")

# Store Status values (MS-ASCMD 2.2.3.177.13)
OK, INVALID, TOO_COMPLEX, RANGE_EXCEEDED = 1, 2, 8, 12


class _Invalid(Exception):
    def __init__(self, status: int):
        self.status = status


class Criteria(NamedTuple):
    """A mailbox query, hashable: the key of the device's kept result set."""
    words: tuple[str, ...]
    folders: tuple[str, ...]
    email_class: bool             # False: a Class no mail item has (Calendar, ...)
    after: datetime | None
    before: datetime | None


def search(ctx: Ctx) -> Answer:
    doc = ctx.doc
    store = find(doc, "Search:Store") if doc is not None and doc.tag == "Search:Search" else None
    if store is None:
        return Answer(400, [], b"")
    name = (text(store, "Search:Name") or "").strip()
    try:
        options = find(store, "Search:Options")
        lo, hi = _range(options)
        if name == "Mailbox" and ctx.version >= 120:
            out = _mailbox(ctx, store, options, lo, hi)
        elif name == "GAL":
            out = _gal(store, lo, hi)
        else:                     # no document library here; Mailbox needs 12.0+
            raise _Invalid(INVALID)
    except _Invalid as e:
        out = [E("Search:Status", e.status)]
    return wbxml(E("Search:Search", E("Search:Status", 1),
                   E("Search:Response", E("Search:Store", *out))))


def _range(options: Element | None) -> tuple[int, int]:
    value = text(options, "Search:Range")
    if value is None:
        return 0, MAX_RESULTS - 1
    lo, sep, hi = value.strip().partition("-")
    if not (sep and _number(lo) and _number(hi)) or int(lo) > int(hi):
        raise _Invalid(INVALID)
    if int(hi) - int(lo) + 1 > MAX_RESULTS:
        raise _Invalid(RANGE_EXCEEDED)
    return int(lo), int(hi)


def _number(s: str) -> bool:
    return 0 < len(s) <= 9 and s.isascii() and s.isdigit()


def _page(results: list[Element], total: int, lo: int) -> list[Element]:
    """Store content: Status, the Results (one empty when none), Range, Total."""
    if not results:
        return [E("Search:Status", OK), E("Search:Result"), E("Search:Total", total)]
    return [E("Search:Status", OK), *results,
            E("Search:Range", f"{lo}-{lo + len(results) - 1}"), E("Search:Total", total)]


# -- Mailbox ------------------------------------------------------------------------

def _mailbox(ctx: Ctx, store: Element, options: Element | None, lo: int, hi: int) -> list[Element]:
    crit = criteria(find(store, "Search:Query"))
    dev, mbox = ctx.dev, ctx.mbox
    kept = dev.search
    if kept is not None and kept[0] == crit and find(options, "Search:RebuildResults") is None:
        sids = [sid for sid in kept[1] if mbox.find(sid) is not None]
    else:
        sids = _matches(ctx, crit)
    dev.search = (crit, sids)
    results = []
    for sid in sids[lo:hi + 1]:
        folder, item = mbox.find(sid)
        msg = ctx.sim.corpus.message(item.msg)
        results.append(E("Search:Result", E("AirSync:Class", "Email"), E("Search:LongId", long_id(sid)),
                         E("AirSync:CollectionId", folder),
                         E("Search:Properties", *email_properties(msg, sid, item, options))))
    return _page(results, len(sids), lo)


def criteria(query: Element | None) -> Criteria:
    """The Query's conditions; _Invalid(2) for a malformed one, _Invalid(8) for Or/nesting."""
    conds = list(kids(query))
    if len(conds) != 1:
        raise _Invalid(INVALID)
    top = conds[0]
    if top.tag == "Search:And":
        conds = list(kids(top))
    words: list[str] = []
    folders: list[str] = []
    email_class = True
    after = before = None
    for c in conds:
        if c.tag == "Search:FreeText":
            words += _WORD.findall((c.text or "").lower())
        elif c.tag == "AirSync:Class":
            email_class = email_class and (c.text or "").strip() == "Email"
        elif c.tag == "AirSync:CollectionId":
            fid = (c.text or "").strip()
            if fid not in FOLDER_IDS:
                raise _Invalid(INVALID)
            folders.append(fid)
        elif c.tag in ("Search:GreaterThan", "Search:LessThan"):
            if find(c, "Email:DateReceived") is None:
                raise _Invalid(INVALID)
            when = _date(text(c, "Search:Value"))
            if c.tag == "Search:GreaterThan":
                after = when if after is None else max(after, when)
            else:
                before = when if before is None else min(before, when)
        elif c.tag in ("Search:And", "Search:Or"):
            raise _Invalid(TOO_COMPLEX)
        else:
            raise _Invalid(INVALID)
    if not words:                 # Exchange needs FreeText words to search mail
        raise _Invalid(INVALID)
    return Criteria(tuple(dict.fromkeys(words)), tuple(dict.fromkeys(folders)), email_class, after, before)


def _date(value: str | None) -> datetime:
    try:
        when = datetime.fromisoformat((value or "").strip().replace("Z", "+00:00"))
    except ValueError:
        raise _Invalid(INVALID) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _matches(ctx: Ctx, crit: Criteria) -> list[str]:
    """ServerIds matching ``crit``: newest first, then by ServerId (deterministic)."""
    if not crit.email_class:
        return []
    corpus, mbox = ctx.sim.corpus, ctx.mbox
    found = []
    for fid in crit.folders or EMAIL_FOLDERS:
        if fid not in EMAIL_FOLDERS:
            continue
        for sid, item in mbox.folders.get(fid, {}).items():
            msg = corpus.message(item.msg)
            if crit.after is not None and not msg.date > crit.after:
                continue
            if crit.before is not None and not msg.date < crit.before:
                continue
            if _has_words(msg, crit.words):
                found.append((msg.date, sid))
    found.sort(key=lambda m: (-m[0].timestamp(), m[1].partition(":")[0], int(m[1].partition(":")[2])))
    return [sid for _, sid in found]


def _has_words(msg, words: tuple[str, ...]) -> bool:
    subject = set(_WORD.findall(msg.subject.lower()))
    missing = [w for w in words if w not in subject]
    if not missing:
        return True
    body = set(_WORD.findall(msg.text.lower()))
    return all(w in body for w in missing)


# -- GAL ----------------------------------------------------------------------------

class Person(NamedTuple):
    first: str
    last: str
    title: str
    office: str
    phone: str

    @property
    def alias(self) -> str:
        return f"{self.first}.{self.last}".lower()

    @property
    def email(self) -> str:
        return f"{self.alias}@seg-fast.test"

    @property
    def display(self) -> str:
        return f"{self.first} {self.last}"


_TITLES = ("Engineer", "Sales Manager", "Accountant", "Director", "Support Lead", "Designer")
DIRECTORY: tuple[Person, ...] = tuple(sorted(
    (Person(first, last, _TITLES[k % len(_TITLES)], f"Building {k % 4 + 1}", f"+1 425 555 01{k:02d}")
     for k, (first, last) in enumerate(zip(_FIRST, _LAST))),
    key=lambda p: (p.last, p.first)))


def _gal(store: Element, lo: int, hi: int) -> list[Element]:
    words = _WORD.findall((text(store, "Search:Query") or "").lower())
    if not words:
        raise _Invalid(INVALID)
    hits = [p for p in DIRECTORY if _gal_match(p, words)]
    results = [E("Search:Result", E("Search:Properties",
                 E("GAL:DisplayName", p.display), E("GAL:Phone", p.phone), E("GAL:Office", p.office),
                 E("GAL:Title", p.title), E("GAL:Company", "Seg-Fast Test"), E("GAL:Alias", p.alias),
                 E("GAL:FirstName", p.first), E("GAL:LastName", p.last), E("GAL:EmailAddress", p.email)))
               for p in hits[lo:hi + 1]]
    return _page(results, len(hits), lo)


def _gal_match(p: Person, words: list[str]) -> bool:
    have = _WORD.findall(f"{p.display} {p.alias}".lower())     # not the shared domain
    return all(any(h.startswith(w) for h in have) for w in words)
