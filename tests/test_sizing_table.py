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
