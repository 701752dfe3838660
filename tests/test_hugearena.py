"""pymalloc's arenas on huge pages (seg_fast._hugearena): objects land in the marked region,
survive churn intact, go back to the kernel a whole 2 MiB page at a time, and a running
`seg-fast serve` worker has the region. The allocator is process-wide and cannot be taken
back, so each check runs in a child interpreter."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from processes import options_answer, start_serve, stop_process, wait_listening
from workers_of import free_port, workers_of

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_enabled() -> bool:
    """The kernel backs a MADV_HUGEPAGE range with huge pages ("always" or "madvise")."""
    try:
        return "[never]" not in THP.read_text()
    except OSError:
        return False


def region_mappings(pid: int | str = "self") -> list[dict]:
    """The process's mappings marked MADV_HUGEPAGE ("hg" in VmFlags): size, Rss and
    AnonHugePages in kB."""
    out, cur = [], None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            cur = {}
        elif first in ("Size:", "Rss:", "AnonHugePages:"):
            cur[first[:-1]] = int(line.split()[1])
        elif first == "VmFlags:" and "hg" in line.split()[1:]:
            out.append(cur)
    return out


CHILD = textwrap.dedent("""
    import gc, json, os, random, sys
    sys.path[:0] = [{src!r}, {tests!r}]
    from seg_fast import _hugearena
    from test_hugearena import region_mappings

    def kb():
        return {{k: sum(m.get(k, 0) for m in region_mappings()) for k in ("Rss", "AnonHugePages")}}

    out = {{"installed": _hugearena.install(), "again": _hugearena.install()}}
    rng = random.Random(7)
    # churn: lists of dicts and strings of every small size, freed in random order, each
    # checked against what was written into it
    live = []
    for step in range(60):
        live.append([{{"i": i, "s": "x" * (i % 500)}} for i in range(rng.randrange(1000, 40000))])
        if len(live) > 6:
            live.pop(rng.randrange(len(live)))
    out["intact"] = all(d["i"] == i and d["s"] == "x" * (i % 500)
                        for batch in live for i, d in enumerate(batch))
    burst = [{{"k": i}} for i in range(400000)]
    out["full"], out["stats_full"] = kb(), _hugearena.stats()
    del burst, live
    gc.collect()
    out["freed"], out["stats_freed"] = kb(), _hugearena.stats()
    again = [{{"k": i}} for i in range(400000)]
    out["again_kb"], out["stats_again"] = kb(), _hugearena.stats()
    out["again_intact"] = all(d["k"] == i for i, d in enumerate(again))
    # a forked child (a worker) starts its own arenas on a fresh 2 MiB page, never on the
    # parent's free ones (shared, copied 4 KiB at a time on the first write)
    del again
    gc.collect()
    odd = [{{"k": i}} for i in range(5000)]          # ~one arena: the parent's top is mid-page
    out["parent"] = _hugearena.stats()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        st = _hugearena.stats()
        mine = [{{"k": i}} for i in range(100000)]
        os.write(w, json.dumps({{"at_fork": st, "after": _hugearena.stats(), "kb": kb(),
                                 "intact": all(d["k"] == i for i, d in enumerate(mine))}}).encode())
        os._exit(0)
    os.close(w)
    out["child"] = json.loads(os.read(r, 1 << 16))
    os.waitpid(pid, 0)
    print(json.dumps(out))
""")


def run_child() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = CHILD.format(src=src, tests=str(Path(__file__).resolve().parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_arenas_come_from_the_region_survive_churn_and_go_back_whole():
    out = run_child()
    assert out["installed"] is True and out["again"] is True
    assert out["intact"] and out["again_intact"]
    full, freed = out["stats_full"], out["stats_freed"]
    assert full["arena"] in (1 << 18, 1 << 20)            # pymalloc's arena size on 64-bit
    assert full["from_region"] * full["arena"] >= 40 << 20  # the burst's ~60 MB came from it
    assert full["declined"] == 0
    # the burst's arenas are free for reuse and their pages went back to the kernel
    assert freed["free"] * freed["arena"] >= 40 << 20
    assert freed["used"] == full["used"]
    assert out["freed"]["Rss"] < out["full"]["Rss"] - 40 * 1024
    # the same burst again reuses the freed arenas: the region did not grow
    assert out["stats_again"]["used"] <= full["used"]
    parent, child = out["parent"], out["child"]
    huge = 2 << 20
    assert parent["free"] > 0 and child["at_fork"]["free"] == 0
    assert child["at_fork"]["used"] == (parent["used"] + huge - 1) // huge * huge
    assert child["after"]["from_region"] > child["at_fork"]["from_region"] and child["intact"]
    if thp_enabled():
        assert child["kb"]["AnonHugePages"] >= 4096
        # backed by 2 MiB pages, before and after reuse (a page given back in halves would
        # have been split, and its range backed by small pages from then on)
        assert out["full"]["AnonHugePages"] >= 40 * 1024
        assert out["again_kb"]["AnonHugePages"] >= 40 * 1024


@pytest.mark.parametrize("setting", ["huge_pages = true\n", ""])
def test_a_running_serve_worker_keeps_its_objects_on_huge_pages(tmp_path, setting):
    port = free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
                   '[upstream]\nurl = "http://127.0.0.1:9"\n[admin]\nenabled = false\n'
                   f'[policy]\nallow_if_no_policies = true\n[limits]\n{setting}')
    proc = start_serve(cfg, tmp_path)
    try:
        wait_listening(port, proc)
        # an answer from the worker first: it is serving with whatever it allocated since the fork
        assert options_answer(port).startswith(b"HTTP/1.1 ")
        workers = workers_of(proc.pid)
        assert len(workers) == 1
        regions = [(pid, m) for pid in workers for m in region_mappings(pid)]
        if not setting:
            assert regions == []          # limits.huge_pages off by default: pymalloc's own arenas
            return
        assert regions, "no worker has a MADV_HUGEPAGE region"
        assert all(m["Size"] >= 8 << 20 for _, m in regions)   # 8 GiB reserved, in kB
        # 1,500 devices that have sent half a request head: what the worker keeps for them
        # (connections, buffers, the head so far) lands in the region, on huge pages
        before = sum(m["Rss"] for _, m in regions)
        devices = []
        try:
            for _ in range(1500):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(b"OPTIONS /Microsoft-Server-ActiveSync HTTP/1.1\r\nHost: gw\r\n")
                devices.append(s)
            assert options_answer(port).startswith(b"HTTP/1.1 ")    # all taken in by now
            after = region_mappings(workers[0])
            assert sum(m["Rss"] for m in after) >= before + 4096
            if thp_enabled():
                # forked after the control's arenas: the worker's own start on a fresh 2 MiB page
                assert sum(m["AnonHugePages"] for m in after) >= 4096
        finally:
            for s in devices:
                s.close()
    finally:
        stop_process(proc)
