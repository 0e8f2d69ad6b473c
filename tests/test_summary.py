import json

from flows.config.params import FilterParams, Params
from flows.summary import summary_lines


def test_summary_shows_the_accounting(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({
        "mvimgnet": {"discovered": 10, "accepted": 7, "rejected_ingest": 1, "rejected_filter": 2,
                     "reasons": {"ingest/empty_file": 1, "filter/blurry": 2}}}))
    lines = summary_lines(Params(filter=FilterParams(out_dir=str(tmp_path))))
    assert lines[1].split() == ["mvimgnet", "10", "7", "1", "2"]
    assert "filter/blurry: 2" in "\n".join(lines)
