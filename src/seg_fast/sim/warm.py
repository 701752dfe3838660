"""The simulator's answer templates built before a sizing run, not in its window.

A shard's simulator encodes each Sync item's ApplicationData once per (message,
read flag, shape) and each fetched attachment's Properties once (splice.py), the
first time a device is sent that message. The pool is 400 messages, so a run builds
~1,700 templates (the setup download's and the steady state's shapes, both body
types, and the ~100 attachments: base64 of up to 10 MB each) and a short run builds
most of them in its measured window: 8-11% of a 2,000-device shard's CPU at real
rates went to building templates (cProfile of the hold window), a cost a long run
pays once and then never again. ``warm`` builds them all up front, through the
simulator's own request path (``_answer``), with the exact requests the fleet's
devices send, so the cache keys and bytes are the ones the run will ask for.

It leaves no trace a run could see: the warm-up user's mailbox is made without
taking messages from the simulator's delivery sequence, its devices are given a
PolicyKey instead of provisioning (which draws a serial), and the mailbox, the
remembered Authorization and the answer counts are removed afterwards. Answers are
byte for byte those of a simulator that was not warmed (tests/test_sim_warm.py).
"""
from __future__ import annotations

import base64

from seg_fast.sim import fleet_eas as eas
from seg_fast.sim.commands import file_reference
from seg_fast.sim.state import INBOX, Item, Mailbox, normalize_user
from seg_fast.sim.tree import E, encode

USER = "fleet-warm-up"          # not a fleet device's user (user<N>)
POLICY_KEY = "1"
# the fleet's Sync shapes: both body types, the setup download (truncated) and the
# steady state (whole bodies)
SHAPES = [(body_type, trunc) for trunc in (eas.SETUP_TRUNCATION, None) for body_type in (2, 4)]


def warm(sim, pool: int, password: str) -> int:
    """Build the templates of messages 0..pool-1 (the corpus pool) for every shape the
    fleet asks for, and of every attachment among them; the answers sent."""
    if sim.splice_cache is None:          # answers built whole every time: nothing to keep
        return 0
    user = normalize_user(USER)
    auth = b"Basic " + base64.b64encode(f"{USER}:{password}".encode())
    if user in sim.mailboxes:
        raise ValueError(f"warm-up user {USER} already has a mailbox")
    mbox = sim.mailboxes[user] = Mailbox(user)
    sids = [mbox.add(INBOX, Item(i)) for i in range(pool)]     # not sim.deliver: no messages taken
    answers = 0

    def ask(device_id: str, cmd: str, body: bytes) -> bytes:
        nonlocal answers
        target = (f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User={USER}&DeviceId={device_id}"
                  "&DeviceType=iPhone").encode()
        headers = [(b"host", b"mail.seg-fast.test"), (b"ms-asprotocolversion", b"14.1"),
                   (b"user-agent", b"Apple-iPhone15C2/2101.55"),
                   (b"content-type", b"application/vnd.ms-sync.wbxml"), (b"authorization", auth),
                   (b"x-ms-policykey", POLICY_KEY.encode()), (b"content-length", str(len(body)).encode())]
        answer = sim._answer(b"POST", target, headers, body)
        answers += 1
        if answer.status != 200:
            raise RuntimeError(f"warm-up {cmd}: HTTP {answer.status}")
        return answer
    counts = sim.counts.copy()
    try:
        for k, (body_type, trunc) in enumerate(SHAPES):
            device_id = f"WARMUP{k}"
            mbox.device(device_id).policy_key = POLICY_KEY
            key = "0"
            while True:
                answer = ask(device_id, "Sync", encode(eas.sync_tree(key, body_type, trunc)))
                got = answer.facts
                if got is None or got.status != "1" or not got.sync_key:
                    raise RuntimeError(f"warm-up Sync: {got!r}")
                key = got.sync_key
                if got.sync_key != "1" and not got.more:
                    break
        mbox.device("WARMUPF").policy_key = POLICY_KEY
        for sid, i in zip(sids, range(pool)):
            for n in range(len(sim.corpus.message(i).attachments)):
                ask("WARMUPF", "ItemOperations", encode(E("ItemOperations:ItemOperations", E(
                    "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                    E("AirSyncBase:FileReference", file_reference(sid, n))))))
    finally:
        del sim.mailboxes[user]
        sim._auth_ok.pop(auth.decode("latin-1"), None)
        sim.counts = counts
    return answers
