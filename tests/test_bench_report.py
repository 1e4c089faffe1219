"""``minitron bench all``: JSON extraction from a benchmark's output and the target table."""

import json

import pytest

from minitron.pipeline.bench.collect import BenchAllConfig, TARGETS, last_json_object, markdown, run, verdict


def test_last_json_object_skips_logs():
    text = "loading...\n{not json\n" + json.dumps({"a": 1}) + "\nprogress 50%\n" + json.dumps({"b": {"c": 2}}, indent=2)
    assert last_json_object(text) == {"b": {"c": 2}}
    with pytest.raises(ValueError):
        last_json_object("no json here")


def test_verdicts_follow_the_direction_of_each_target():
    assert verdict("kd_loss_memory_ratio", 0.05) == "met"
    assert verdict("kd_loss_memory_ratio", 0.5) == "MISSED"
    assert verdict("throughput_ratio_width_c8", 1.7) == "met"
    assert verdict("throughput_ratio_width_c8", 1.2) == "MISSED"
    assert verdict("distill_throughput_ratio", None) == "not measured"


def test_report_merges_included_results(tmp_path):
    saved = tmp_path / "prune_8b.json"
    saved.write_text(json.dumps({"prune_8b_width_seconds": 900.0, "prune_8b_peak_rss_gib": 5.0}))
    out = run(BenchAllConfig(out=str(tmp_path / "bench"), benches=[], include=[str(saved), str(tmp_path / "nope.json")]))
    md = out.read_text()
    assert "| `prune_8b_width_seconds` | <= 1200 | 900 | met |" in md
    assert "| `prune_8b_peak_rss_gib` | <= 4.0 | 5 | MISSED |" in md
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert "not found" in data["nope"]["error"]
    assert all(f"`{k}`" in markdown(data) for k in TARGETS)
