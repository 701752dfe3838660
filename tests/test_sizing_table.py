"""benchmarks/sizing_table.py: the README's per-run tables remade from the committed summaries."""
from __future__ import annotations

import json
from pathlib import Path

from seg_fast.sim import sizing_table

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_the_security_off_search_table_is_remade_from_its_summary():
    summary = json.loads((RESULTS / "sizing-off-20261206-060918.json").read_text())
    lines = sizing_table.runs_table(summary).splitlines()
    assert lines[0] == sizing_table.HEAD and lines[1].count("---") == 10
    rows = lines[2:]
    # every run of every point, in the walk's order: 100,000 twice, 125,000 once (missed), 112,500 twice, 118,750
    assert [r.split(" | ")[0] for r in rows] == [
        "| 100,000 (50,000), run 1", "| 100,000 (50,000), run 2", "| 125,000 (62,500), run 1",
        "| 112,500 (56,250), run 1", "| 112,500 (56,250), run 2", "| 118,750 (59,375), run 1"]
    last = rows[-1].split(" | ")
    assert last[1:5] == ["misses", "ItemOperations 43.5 / 114.0", "37.7% (75.4% of its 0.5); 0.0226",
                         "4,980 of 9,403 (181 s)"]
    assert last[-2:] == ["7.9", "8335382 |"]     # the host's loop over its windows, then the commit
    assert all(r.count(" | ") == 9 for r in rows)


def test_a_pending_points_finished_runs_are_listed_as_such(tmp_path, capsys):
    summary = json.loads((RESULTS / "sizing-off-20261206-060918.json").read_text())
    first = summary["points"][0]["verdict"]["each_run"][0]
    summary["points"] = summary["points"][:1]
    summary["pending"] = {"devices": 56_250, "held_to_cores": 0.5, "runs": [
        {"devices": 56_250, "verdict": {k: v for k, v in first.items() if k not in ("run", "paths")},
         "measured": {"commit": "abc1234", "when": "2026-12-06T07:00:00Z"},
         "paths": {"direct": {"speed_ms": {"cpu0": 14.0, "cpu1": 15.0}}, "gateway": {"speed_ms": {"cpu0": 16.0}}}}]}
    path = tmp_path / "s.partial.json"
    path.write_text(json.dumps(summary))
    assert sizing_table.main([str(path)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 3
    assert rows[-1].startswith("| 112,500 (56,250), run 1 | meets (its point unfinished) | ")
    assert rows[-1].endswith(" | 15.0 | abc1234 |")
    path.write_text("{}x")
    assert sizing_table.main([str(path)]) == 2
    assert "not a sizing summary" in capsys.readouterr().err


def test_the_tails_table_gives_each_path_its_added_p999_beside_its_mirror_and_net_of_the_load_side(capsys):
    # the 100,000-device claim pair: the gateway alone beside the direct path, every class of its own
    assert sizing_table.main(["--tails", str(RESULTS / "sizing-off-20261205-194106.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| per core (driven), run, path | Sync | SendMail | ItemOperations | FolderSync "
                        "| GetItemEstimate | Settings |")
    assert [r.split(" | ")[:2] for r in lines[2:]] == [
        ["| 100,000 (100,000), run 1, gateway", "25.1 / 18.6 (20.3 / 14.8)"],
        ["| 100,000 (100,000), run 2, gateway", "33.4 / 17.8 (25.9 / 14.1)"]]
    # ItemOperations' mirror above its added p99.9: the direct run alone varied that much
    assert lines[2].split(" | ")[3] == "32.2 / 44.4 (27.4 / 44.3)"
    # the side-by-side run at half a core: nginx's row under the gateway's, the pooled class last
    summary = json.loads((RESULTS / "sizing-off-20261206-101005.json").read_text())
    lines = sizing_table.tails_table(summary).splitlines()
    assert lines[0] == "| per core (driven), run, path | Sync | SendMail | ItemOperations | other |"
    assert [r.split(" | ")[0] for r in lines[2:]] == ["| 60,000 (30,000), run 1, gateway", "| 60,000 (30,000), run 1, nginx"]
    assert lines[3].split(" | ")[3] == "64.6 / 34.0 (64.7 / 34.0)"
    assert sizing_table.main(["--tails"]) == 2
