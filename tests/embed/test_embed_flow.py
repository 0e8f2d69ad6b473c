import json

import pyarrow.parquet as pq
import yaml

from embed_inputs import make_inputs


def test_embed_flow_end_to_end(prefect_harness, tmp_path):
    from flows.embed.flow import embed_flow

    inputs = make_inputs(tmp_path / "data", n=6, unmasked=(3,))
    params = {
        "sources": {"mvimgnet_root": inputs.sources.mvimgnet_root, "openimages_root": inputs.sources.openimages_root},
        "filter": {"out_dir": str(tmp_path / "data")},
        "segment": {"out_dir": str(tmp_path / "data")},
        "embed": {"out_dir": str(tmp_path / "embed"), "profile": "tiny", "batch_size": 4, "num_workers": 1},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stats = embed_flow(str(tmp_path / "params.yaml"))
    assert stats["count"] == 5 and stats["rejected"] == {"missing_mask": 1}
    assert stats["model_id"] == "cc-tiny-ViT:random-seed0" and stats["random_weights"]
    table = pq.read_table(tmp_path / "embed" / "embeddings.parquet")
    assert table["frame_id"].to_pylist() == [f for k, f in enumerate(inputs.frame_ids) if k != 3]
    written = json.loads((tmp_path / "embed" / "stats.json").read_text())
    timing = json.loads((tmp_path / "embed" / "timing.json").read_text())
    assert {**written, **timing} == stats and set(timing) == {  # stats.json: no clock
        "seconds", "throughput_img_s", "first_batch_s", "steady_img_s", "setup_s", "outputs_s"}
