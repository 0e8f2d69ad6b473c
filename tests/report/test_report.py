from flows.config.params import PairsParams, SourcesParams
from flows.pairs.stage import build_pairs
from flows.splits import SplitRule
from flows.report.build import ReportInputs, build_report
from flows.schemas import NEIGHBOURS
from flows.tables import write_table
from pipeline_tables import write_images


def test_report_files(tables):
    write_images(tables, tables / "mv")
    write_images(tables, tables / "oi")
    build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet", tables,
                PairsParams(min_angle_deg=60.0), SplitRule(heldout_fraction=0.0, seed=0))
    subjects = ["mvimgnet:1/aaaaaaaa", "mvimgnet:1/bbbbbbbb", "openimages:0001/k"]
    rows = [{"level": "subject", "i": s, "j": t, "rank": k, "r": 0.5 - 0.1 * k, "near_duplicate": False}
            for s in subjects for k, t in enumerate(x for x in subjects if x != s)]
    write_table(tables / "neighbours.parquet", NEIGHBOURS, rows)
    inputs = ReportInputs(tables / "frames.parquet", tables / "masks.parquet", tables / "pairs.parquet",
                          tables / "neighbours.parquet", {"pairs": tables / "stats.json"})
    sources = SourcesParams(mvimgnet_root=str(tables / "mv"), openimages_root=str(tables / "oi"))
    out = tables / "report"
    summary = build_report(inputs, sources, out, n_pairs=4, n_subjects=2)
    for name in ("report.md", "pairs.png", "neighbours.png", "histograms.png", "hist_area.csv", "hist_angle.csv",
                 "hist_similarity.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "![pairs](pairs.png)" in summary["markdown"] and '"pairs_total"' in summary["markdown"]
    assert sum(summary["histograms"]["subject area fraction"]) == 17  # one per mask row (15 MVImgNet + 2 OpenImages)
    assert sum(summary["histograms"]["subject similarity r (each subject's top-k neighbours)"]) == len(rows)
    first = (out / "pairs.png").read_bytes()
    build_report(inputs, sources, out, n_pairs=4, n_subjects=2)
    assert (out / "pairs.png").read_bytes() == first  # deterministic


def test_a_subject_whose_first_frame_has_no_mask_is_shown_by_another(tables):
    # segment rejected the first frame: its subject is drawn from the first frame that has a mask
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    write_images(tables, tables / "mv")
    write_images(tables, tables / "oi")
    masks = pq.read_table(tables / "masks.parquet")
    first = masks.filter(pc.equal(masks["subject_id"], "mvimgnet:1/aaaaaaaa"))["frame_id"][0]
    pq.write_table(masks.filter(pc.not_equal(masks["frame_id"], first)), tables / "masks.parquet")
    build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet", tables,
                PairsParams(min_angle_deg=60.0), SplitRule(heldout_fraction=0.0, seed=0))
    subjects = ["mvimgnet:1/aaaaaaaa", "mvimgnet:1/bbbbbbbb"]
    write_table(tables / "neighbours.parquet", NEIGHBOURS, [
        {"level": "subject", "i": s, "j": t, "rank": 0, "r": 0.5, "near_duplicate": False}
        for s, t in (subjects, subjects[::-1])])
    inputs = ReportInputs(tables / "frames.parquet", tables / "masks.parquet", tables / "pairs.parquet",
                          tables / "neighbours.parquet", {})
    sources = SourcesParams(mvimgnet_root=str(tables / "mv"), openimages_root=str(tables / "oi"))
    build_report(inputs, sources, tables / "report", n_pairs=2, n_subjects=2)
    assert (tables / "report" / "neighbours.png").stat().st_size > 0


def test_histograms_keep_values_past_the_edges(tmp_path):
    import numpy as np

    from flows.report.build import _histogram
    from flows.schemas import NEIGHBOURS

    rows = [{"level": "frame", "i": "a", "j": "b", "rank": 0, "r": r, "near_duplicate": False}
            for r in (-1.0, 0.5, 1.0, 1.0003)]  # 1.0003: a float16 cosine past the last edge
    write_table(tmp_path / "n.parquet", NEIGHBOURS, rows)
    counts = _histogram(tmp_path / "n.parquet", NEIGHBOURS, "r", np.linspace(-1, 1, 5))
    assert counts.tolist() == [1, 0, 0, 3]  # 0.5, 1.0 and 1.0003 in the last (closed) bin
