"""The keep-alive lane carries exchanges the email-security transforms change (proxy/lane.py,
exchange.transformed_parts), through a running gateway with the profile's policies.

The oracles: the content pipeline called directly (test_transform_offload._reference), and
the same gateway with the lane and the fast lane off (the general path). Every answer is what
they make of it, byte for byte (a sealed attachment's envelope, whose nonce is random, opened
to the original file), and the connection is kept throughout. The lot's counters show which
way each went, so the test cannot pass with the lane taking none: a small whole answer is
transformed in the lot's step; a large one (THREAD_TRANSFORM_BYTES and up, transformed in a
thread) and one a transform refuses (500, never the untransformed bytes) go to a task."""
from __future__ import annotations

import trio

from proxy_helpers import Client, MiniUpstream
from test_transform_offload import (ANSWERS, FETCH_REQUEST, SYNC_REQUEST, _env, _headers, _path, _reference,
                                    _same, _store)
from seg_fast.config import load_config
from seg_fast.proxy import downstream, exchange
from seg_fast.proxy.gateway import Gateway
from seg_fast.sim.oracle import Opener

# A Sync answer cut short: the pipeline cannot read it (ContentError), so the device gets 500.
BROKEN = ANSWERS["links-small"][1][:200]
ANSWER_OF = {name: body for name, (_cmd, body) in ANSWERS.items()} | {"broken": BROKEN}
COMMAND_OF = {name: cmd for name, (cmd, _body) in ANSWERS.items()} | {"broken": "Sync"}
SMALL = ("links-small", "pdf-small", "fetch-small")
# The Sync listing the PDF comes first: the fetch's file name is the one it named.
ORDER = ["pdf-small", "links-small", "fetch-small", "links-big", "broken", "fetch-big"] * 3


def _mail_server(req, body):
    name = dict(req.headers)[b"x-test-answer"].decode()
    answer = ANSWER_OF[name]
    return 200, [(b"Content-Type", b"application/vnd.ms-sync.wbxml"), (b"Content-Length", b"%d" % len(answer))], \
        answer


async def _until(predicate, bound: float = 20.0) -> None:
    with trio.fail_after(bound):
        while not predicate():
            await trio.sleep(0.002)


def test_the_lane_transforms_small_answers_as_the_general_path_does(tmp_path, monkeypatch):
    _store(tmp_path)
    got: dict = {}
    counts: dict = {}

    async def main():
        up = MiniUpstream(_mail_server)
        async with trio.open_nursery() as nursery:
            await nursery.start(up.serve)
            gw = Gateway(load_config(None, env=_env(tmp_path, up.port)))
            await nursery.start(gw.serve)
            for lane in (True, False):
                monkeypatch.setattr(downstream, "LANE", lane)
                monkeypatch.setattr(exchange, "FAST_LANE", lane)
                before = (gw.parking.carried, gw.parking.handed)
                dev = await Client.connect(gw.port)
                for i, name in enumerate(ORDER):
                    command = COMMAND_OF[name]
                    resp, body = await dev.request(
                        b"POST", _path(command, "DEV1").encode(),
                        [(k.encode(), v.encode()) for k, v in _headers(name).items()],
                        FETCH_REQUEST if command == "ItemOperations" else SYNC_REQUEST)
                    got[(lane, i)] = (resp.status_code, dict(resp.headers).get(b"connection"), body)
                await dev.aclose()
                await _until(lambda: gw.active == 0)
                counts[lane] = (gw.parking.carried - before[0], gw.parking.handed - before[1])
            nursery.cancel_scope.cancel()

    trio.run(main)
    key = str(tmp_path / "master.key")
    opener = Opener(key, str(tmp_path / "keys.json"))
    for i, name in enumerate(ORDER):
        for lane in (True, False):
            status, connection, body = got[(lane, i)]
            assert connection is None, (name, lane)          # kept alive, both ways
            if name == "broken":
                assert status == 500 and b"could not be checked" in body, (lane, body[:200])
            else:
                assert status == 200, (name, lane, body[:200])
                _same(name, body, _reference(name, key), opener)
    assert counts[False] == (0, 0)
    carried, handed = counts[True]
    # A request that follows an answer the lot wrote is read by the lot: a small one is
    # transformed and written there (one may come in two reads: then a task's), a large or
    # broken one goes to a task. (After a task's answer the task may read the next request
    # itself.) The lot never carries more than the small answers.
    pairs = list(zip(ORDER, ORDER[1:]))
    assert sum(a in SMALL and b in SMALL for a, b in pairs) - 1 <= carried <= sum(n in SMALL for n in ORDER[1:]), \
        counts
    assert handed >= sum(a in SMALL and b not in SMALL for a, b in pairs), counts
