"""How long one answer's email-security transform holds the thread, by answer size.

    python benchmarks/transform_steps.py [--repeat 5] [--json PATH]

The answers are BENCH-PROFILE's (corpus messages, the sizing run's policies): a Sync
answer with one Type 4 (MIME) body carrying an attachment of 50 KB, 300 KB, 2 MB and
10 MB (a PDF: sealed for a managed device), the same for an unmanaged device (a PNG:
blocked), a Type 2 (HTML, links) body, and an ItemOperations Fetch of each attachment
size (inline base64 Data, sealed). Each is run through the pipeline's Transform as the
gateway does (``transform_answer_parts``); the median wall and thread-CPU time of
``--repeat`` runs is printed, and the median of the minor page faults each run took (its
first writes to fresh memory: ~3 us each here, counted in the CPU time). Such a call is
one loop step when it runs on the loop.

``--gil``: also runs each transform in a thread while the main thread counts how often
it gets the GIL back (sys.getswitchinterval() apart if the transform holds it): the share
of the transform's time the other thread could run says whether the work releases the GIL.
"""
from __future__ import annotations

import argparse
import base64
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

from seg_fast.content import pipeline
from seg_fast.content.keys import Keyring
from seg_fast.content.model import AttachmentPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import Element as E, encode
from seg_fast.sim.corpus import REWRITE_DOMAINS, Corpus, Message
from seg_fast.sim.oracle import BLOCK_UNMANAGED, ENCRYPT_MANAGED

WB = [(b"Content-Type", b"application/vnd.ms-sync.wbxml")]
SIZES = {"50K": 50 * 1024, "300K": 300 * 1024, "2M": 2 * 1024 * 1024, "10M": 10 * 1024 * 1024}


def policy() -> EmailSecurityPolicy:
    return EmailSecurityPolicy(
        hyperlinks=HyperlinkPolicy(enabled=True, mode="include", domains=list(REWRITE_DOMAINS)),
        managed_attachments=AttachmentPolicy(file_types={t: "encrypt" for t in ENCRYPT_MANAGED}),
        unmanaged_attachments=AttachmentPolicy(file_types={t: "block" for t in BLOCK_UNMANAGED}))


def find_message(corpus: Corpus, size: int, ext: str) -> Message:
    for i in range(200000):
        m = corpus[i]
        att = m._plan[2]
        if att is not None and att[2] == size and att[1] == ext and not m.signed and not m.classification:
            return m
    raise LookupError(f"no {ext} of {size} bytes")


def sync_answer(data: str, btype: str, att_name: str | None) -> bytes:
    app = [E("Email:Subject", text="s"), E("Email:MessageClass", text="IPM.Note"),
           E("AirSyncBase:Body", [E("AirSyncBase:Type", text=btype),
                                  E("AirSyncBase:EstimatedDataSize", text=str(len(data))),
                                  E("AirSyncBase:Truncated", text="0"),
                                  E("AirSyncBase:Data", text=data)])]
    if att_name:
        app.append(E("AirSyncBase:Attachments", [E("AirSyncBase:Attachment", [
            E("AirSyncBase:DisplayName", text=att_name), E("AirSyncBase:FileReference", text="ref:1"),
            E("AirSyncBase:Method", text="1"), E("AirSyncBase:EstimatedDataSize", text="100")])]))
    return encode(E("AirSync:Sync", [E("AirSync:Collections", [E("AirSync:Collection", [
        E("AirSync:SyncKey", text="1"), E("AirSync:CollectionId", text="1"), E("AirSync:Status", text="1"),
        E("AirSync:Commands", [E("AirSync:Add", [E("AirSync:ServerId", text="1:1"),
                                                 E("AirSync:ApplicationData", app)])])])])]))


def fetch_answer(blob: bytes, ctype: str) -> bytes:
    return encode(E("ItemOperations:ItemOperations", [
        E("ItemOperations:Status", text="1"),
        E("ItemOperations:Response", [E("ItemOperations:Fetch", [
            E("ItemOperations:Status", text="1"), E("AirSyncBase:FileReference", text="ref:1"),
            E("ItemOperations:Properties", [E("AirSyncBase:ContentType", text=ctype),
                                            E("ItemOperations:Data", text=base64.b64encode(blob).decode())])])])]))


def cases(corpus: Corpus):
    for label, size in SIZES.items():
        m = find_message(corpus, size, "pdf")
        name = m.attachments[0][0]
        yield f"Sync Type4 pdf {label} managed (sealed)", "Sync", True, sync_answer(m.mime.decode(), "4", name)
        mp = find_message(corpus, size, "png")
        yield (f"Sync Type4 png {label} unmanaged (blocked)", "Sync", False,
               sync_answer(mp.mime.decode(), "4", mp.attachments[0][0]))
        _n, ctype, blob = m.attachments[0]
        yield f"ItemOperations Fetch pdf {label} managed (sealed)", "ItemOperations", True, fetch_answer(blob, ctype)
    m = corpus[0]
    yield "Sync Type2 HTML (links)", "Sync", True, sync_answer(m.html, "2", None)


def run_once(t, command: str, body: bytes) -> tuple[float, float, int, int]:
    req = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command=command, user="u1",
                     device_id="DEV1", user_agent="Apple-iPhone9C1/1602.99", params={})
    if command == "ItemOperations":
        pipeline._runtime.remember("u1", "ref:1", "file.pdf")
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    w0, c0 = time.perf_counter(), time.thread_time()
    _h, out = t.transform_answer_parts(req, 200, WB, body)
    w1, c1 = time.perf_counter(), time.thread_time()
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0
    n = sum(map(len, out)) if type(out) is list else len(out)
    return (w1 - w0) * 1000, (c1 - c0) * 1000, n, faults


def gil_lag(t, command: str, body: bytes) -> float:
    """The longest the main thread waited past a 1 ms sleep (ms) while the transform ran
    in another thread: what a worker's event loop (an epoll wait in place of the sleep)
    would see with the transform in a thread. Near the switch interval (5 ms) when the
    transform's Python code holds the GIL; longer when its C code holds it."""
    done = threading.Event()

    def work():
        run_once(t, command, body)
        done.set()

    th = threading.Thread(target=work)
    worst = 0.0
    th.start()
    while not done.is_set():
        a = time.perf_counter()
        time.sleep(0.001)
        worst = max(worst, time.perf_counter() - a - 0.001)
    th.join()
    return worst * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gil", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    pipeline.configure(ContentSettings(), keys=Keyring(b"k" * 32))
    corpus = Corpus(1)
    rows = []
    print(f"{'answer':52s} {'bytes':>10s} {'wall ms':>9s} {'cpu ms':>9s} {'faults':>7s}"
          + ("  lag ms (thread)" if args.gil else ""))
    for label, command, managed, body in cases(corpus):
        (t,) = pipeline.transforms_for(policy(), managed=managed, device_id="DEV1", user="u1")
        runs = [run_once(t, command, body) for _ in range(args.repeat)]
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        faults = statistics.median(r[3] for r in runs)
        row = {"answer": label, "bytes_in": len(body), "bytes_out": runs[0][2], "wall_ms": round(wall, 2),
               "cpu_ms": round(cpu, 2), "minor_faults": faults}
        line = f"{label:52s} {len(body):10d} {wall:9.2f} {cpu:9.2f} {faults:7.0f}"
        if args.gil:
            lag = statistics.median(gil_lag(t, command, body) for _ in range(3))
            row["thread_lag_ms"] = round(lag, 2)
            line += f"  {lag:8.2f}"
        print(line, flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"python": sys.version.split()[0], "repeat": args.repeat,
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
