import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cc_model.backbones import clip_tokenizer_from_open_clip
from flows.config.params import ExportParams, PairsParams, SourcesParams
from flows.errors import UserFacingError
from flows.export.shards import caption_for, export_shards
from flows.pairs.stage import build_pairs
from flows.schemas import BACKGROUNDS, FRAMES, MASKS, PAIRS, REJECTS, embeddings_schema
from flows.splits import SplitRule, near_duplicate_groups
from flows.tables import iter_rows
from pipeline_tables import export_tables, near_duplicates_of, write_images


def export(tables, params, *, parallel=False, **kwargs):
    return export_tables(tables, params, parallel=parallel, **kwargs)


def test_one_row_per_pair_split_by_subject(tables):
    params = ExportParams(image_side=64, rows_per_shard=5, heldout_fraction=0.3)
    stats, rows = export(tables, params)
    rule = SplitRule.from_params(params)
    photos = {f["frame_id"]: f["image_path"] for f in iter_rows(tables / "frames.parquet", FRAMES)}
    pairs = list(iter_rows(tables / "pairs.parquet", PAIRS))
    assert sorted(r["sample_id"] for r in rows) == sorted(p["pair_id"] for p in pairs)
    assert stats["train"]["rows"] + stats["heldout"]["rows"] == len(pairs)
    assert stats["train"]["shards"] == -(-stats["train"]["rows"] // 5)
    splits = {}
    for r in rows:
        assert splits.setdefault(r["subject_id"], r["split"]) == r["split"]
        assert r["split"] == rule.of(r["source"], r["subject_id"], photos[r["frame_id"]])
    by_frame = {r["frame_id"] for r in rows}
    for r in rows:  # a multi-view positive is itself a reference of the same split
        if r["positive_frame_id"]:
            assert r["positive_frame_id"] in by_frame


def test_near_duplicate_subjects_share_a_split(tables):
    from flows.schemas import NEAR_DUPLICATES
    from flows.tables import write_table

    a, photo = "mvimgnet:1/aaaaaaaa", "openimages:0002/k"  # subjects the similarity stage calls near-duplicates
    seed = next(s for s in range(100) if SplitRule(heldout_fraction=0.5, seed=s).of_key(a)
                != SplitRule(heldout_fraction=0.5, seed=s).of_photo("train/0002.jpg"))
    (tables / "similarity").mkdir()
    write_table(tables / "similarity" / "near_duplicates.parquet", NEAR_DUPLICATES,
                [{"subject_a": a, "subject_b": photo, "r": 0.99}])
    params = ExportParams(image_side=32, heldout_fraction=0.5, seed=seed)
    stats, rows = export(tables, params)
    split_of = {r["subject_id"]: r["split"] for r in rows}
    assert split_of[a] == split_of[photo]
    assert stats["near_duplicate_groups"] == {"pairs": 1, "groups": 1, "units": 2, "largest": 2, "units_moved": 1,
                                              "unknown_subjects": 0}
    stats, rows = export(tables, dataclasses.replace(params, group_near_duplicates=False))
    split_of = {r["subject_id"]: r["split"] for r in rows}
    assert split_of[a] != split_of[photo] and "near_duplicate_groups" not in stats


def test_an_empty_held_out_split_is_logged(tables, caplog):
    with caplog.at_level("WARNING", logger="flows.export"):
        stats, _ = export(tables, ExportParams(image_side=32, heldout_fraction=1e-9))
    assert stats["heldout"]["rows"] == 0
    assert "the held-out split has 0 of 32 rows (0.0%; export.heldout_fraction 1e-09)" in caplog.text


def test_a_held_out_share_far_from_its_fraction_names_the_largest_group(caplog):
    from flows.export.shards import _check_split_sizes

    params = ExportParams(heldout_fraction=0.1)
    grouping = {"largest": 7}
    with caplog.at_level("WARNING", logger="flows.export"):
        _check_split_sizes({"heldout": {"rows": 150}, "train": {"rows": 1850}}, params, grouping)  # 7.5%: fine
        _check_split_sizes({"heldout": {"rows": 10}, "train": {"rows": 90}}, params, grouping)  # too few rows to judge
        assert not caplog.records
        _check_split_sizes({"heldout": {"rows": 10}, "train": {"rows": 1990}}, params, grouping)
    assert caplog.messages == ["export: the held-out split has 10 of 2000 rows (0.5%; export.heldout_fraction 0.1); "
                               "the largest near-duplicate group holds 7 objects/photos, and a group lands in one "
                               "split (similarity.near_duplicate_r, export.group_near_duplicates)"]


def test_images_masks_and_captions(tables):
    params = ExportParams(image_side=64)
    tokenizer = clip_tokenizer_from_open_clip()  # cc_model's tokenizer: SD1.5's vocabulary
    (sks,) = tokenizer("sks", add_special_tokens=False).input_ids
    _, rows = export(tables, params)
    for r in rows:
        image = Image.open(io.BytesIO(r["image_jpeg"]))
        assert image.size == (r["width"], r["height"]) and min(image.size) == 64
        mask = mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["mask_rle"]})
        ys, xs = np.nonzero(mask)
        # the fixture's subject box is x 20..60 of 100, y 16..56 of 80
        assert abs(xs.min() / r["width"] - 0.2) < 0.03 and abs(ys.max() / r["height"] - 0.7) < 0.03
        input_ids = tokenizer(r["caption"], padding="max_length", max_length=77).input_ids  # what the model reads
        assert input_ids[r["placeholder_index"]] == sks and r["class_name"] in r["caption"]
        assert r["positive_embedding_id"] == (r["positive_frame_id"] or r["frame_id"])


def test_backgrounds_are_exported(tables):
    params = ExportParams(image_side=32)
    stats, rows = export(tables, params)
    used = {r["aug_background"] for r in rows if r["aug_background"]}
    table = {r["image_path"] for r in iter_rows(tables / "export" / "backgrounds.parquet", BACKGROUNDS)}
    assert used == table and stats["backgrounds"] == len(table)


def test_caption_template():
    params = dataclasses.replace(ExportParams(), caption_template="{placeholder} {class_name} on a table")
    assert caption_for("mug", params) == ("sks mug on a table", 1)  # 0 is the start token
    params = dataclasses.replace(params, caption_template="a photograph of {class_name} sks")
    assert caption_for("teddy bear", params) == ("a photograph of teddy bear sks", 6)


def test_caption_errors():
    with pytest.raises(ValueError, match="2 BPE tokens"):
        caption_for("mug", dataclasses.replace(ExportParams(), placeholder_token="zzqx"))
    with pytest.raises(ValueError, match="does not hold the placeholder"):
        caption_for("mug", dataclasses.replace(ExportParams(), caption_template="a {placeholder}s {class_name}"))
    with pytest.raises(ValueError, match="CLIP keeps 75"):
        caption_for("mug " * 80, ExportParams())


def test_every_joined_frame_is_a_reference_or_a_pairs_reject(tables):
    from flows.accounting import AccountingError
    from flows.tables import write_table

    write_images(tables, tables / "mv")
    write_images(tables, tables / "oi")
    build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet", tables,
                PairsParams(min_angle_deg=170.0), SplitRule.from_params(ExportParams()))  # A/007: no positive
    sources = SourcesParams(mvimgnet_root=str(tables / "mv"), openimages_root=str(tables / "oi"))
    call = dict(frames=tables / "frames.parquet", masks=tables / "masks.parquet", embeddings=tables / "embeddings.parquet",
                pairs=tables / "pairs.parquet", pair_rejects=tables / "rejects.parquet", sources=sources,
                out_dir=tables / "export", params=ExportParams(image_side=32, workers=1),
                near_duplicates=near_duplicates_of(tables))
    stats = export_shards(**call)
    assert [r["item_id"] for r in iter_rows(tables / "rejects.parquet", REJECTS)] == ["mvimgnet:1/aaaaaaaa/007.jpg"]
    assert stats["reference_frames"] == 16 - 1
    write_table(tables / "rejects.parquet", REJECTS, [])  # the pairs stage's reasons gone: export refuses
    with pytest.raises(AccountingError, match="aaaaaaaa/007.jpg: no pair and no pairs reject"):
        export_shards(**call)


def test_a_photo_and_its_backgrounds_stay_in_one_split(tables):
    # two boxes on one photo: a second OpenImages box on train/0001.jpg
    from flows.tables import write_table
    from pipeline_tables import frame, mask_row

    frames = list(iter_rows(tables / "frames.parquet", FRAMES))
    masks = list(iter_rows(tables / "masks.parquet", MASKS))
    emb_schema = embeddings_schema(8)
    embeddings = list(iter_rows(tables / "embeddings.parquet", emb_schema))
    frames.append(frame("openimages:0001/m", "openimages:0001/m", "openimages", path="train/0001.jpg"))
    masks.append(mask_row("openimages:0001/m", "openimages:0001/m"))
    embeddings.append({**embeddings[-1], "frame_id": "openimages:0001/m", "subject_id": "openimages:0001/m"})
    write_table(tables / "frames.parquet", FRAMES, frames)
    write_table(tables / "masks.parquet", MASKS, masks)
    write_table(tables / "embeddings.parquet", emb_schema, embeddings)
    for seed in range(6):
        params = ExportParams(image_side=32, heldout_fraction=0.5, seed=seed)
        _, rows = export(tables, params)
        # the copied embedding makes the new box a near-duplicate of photo 0002: grouped with it
        groups = near_duplicate_groups(tables / "similarity" / "near_duplicates.parquet", tables / "frames.parquet")
        assert set(groups.groups) == {"openimages:train/0001.jpg", "openimages:train/0002.jpg"}
        photos = {f["frame_id"]: f["image_path"] for f in frames}
        split_of_photo = {}
        for r in rows:
            assert split_of_photo.setdefault(photos[r["frame_id"]], r["split"]) == r["split"]
            if r["aug_background"]:
                assert SplitRule.from_params(params, groups.groups).of_photo(r["aug_background"]) == r["split"]


def test_shards_are_the_same_for_any_number_of_workers(tables):
    one = export(tables, ExportParams(image_side=48, rows_per_shard=4, workers=1))
    two = export(tables, ExportParams(image_side=48, rows_per_shard=4, workers=2), parallel=True)
    assert one == two and len(one[1]) > 4
    backgrounds = list(iter_rows(tables / "export" / "backgrounds.parquet", BACKGROUNDS))
    assert backgrounds and all(row["image_jpeg"] for row in backgrounds)


def test_shards_encoded_on_a_dask_cluster_equal_the_local_ones(tables, dask_cluster, monkeypatch, caplog):
    from flows.config.params import ClusterParams

    params = ExportParams(image_side=48, rows_per_shard=4, workers=1)
    here = export(tables, params)
    monkeypatch.chdir(tables)  # roots relative to here; the workers run in another folder
    with caplog.at_level("INFO", logger="flows.export"):
        there = export(tables, params, cluster=ClusterParams(address=dask_cluster.scheduler_address),
                       relative_roots=True)
    assert here == there and len(here[1]) > 4
    assert f"image work goes to the Dask cluster at {dask_cluster.scheduler_address} (2 worker threads)" in caplog.text
    assert (tables / "export" / "backgrounds.parquet").is_file()


def test_resized_jpeg_decodes_large_jpegs_at_a_reduced_scale(tmp_path, monkeypatch):
    from flows.export.shards import resized_jpeg

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).resize((1200, 800), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)
    resized_from = []
    real_resize = Image.Image.resize

    def recording_resize(image, *args, **kwargs):
        resized_from.append(image.size)
        return real_resize(image, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    jpeg, size, original = resized_jpeg(tmp_path / "big.jpg", 100, 95)
    monkeypatch.undo()
    assert original == (1200, 800) and size == (150, 100)
    assert resized_from == [(150, 100)]  # decoded at 1/8 in the DCT domain (never below the target)
    out = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    whole = np.asarray(big.resize(size, Image.BICUBIC), dtype=np.float32)  # decoded whole, then resized
    assert out.shape == whole.shape and np.abs(out - whole).mean() < 4.0  # same picture, 0-255 scale


def test_an_image_and_its_mask_must_have_one_size(tmp_path):
    from flows.export.shards import ImageChangedError, ImageWork, encode_image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    rle = mask_utils.encode(np.asfortranarray(np.ones((30, 40), np.uint8)))["counts"]
    jpeg, size, (mask,) = encode_image(ImageWork(path=str(tmp_path / "a.jpg"), side=15, quality=90,
                                                 masks=(("f1", rle, (40, 30)),)))
    assert size == (20, 15) and mask_utils.area({"size": [15, 20], "counts": mask}) == 300
    with pytest.raises(ImageChangedError, match=r"f2: image .*a.jpg is \(40, 30\), its mask \(30, 40\); the source changed"):
        encode_image(ImageWork(path=str(tmp_path / "a.jpg"), side=15, quality=90, masks=(("f2", rle, (30, 40)),)))


@pytest.mark.parametrize("damage", ["truncated", "missing", "not_an_image"])
def test_an_image_damaged_after_ingest_is_a_clear_error(tmp_path, damage):
    from flows.export.shards import ImageChangedError, ImageWork, encode_image

    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path, quality=90)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ImageChangedError, match=r"a\.jpg: .*Error: .*; the source changed after ingest") as caught:
        encode_image(ImageWork(path=str(path), side=100, quality=90))
    assert isinstance(caught.value, UserFacingError)  # the CLI ends in one error: line


def test_every_row_carries_its_pairs_row(tables):
    _, rows = export(tables, ExportParams(image_side=32, heldout_fraction=0.3))
    pairs = {p["pair_id"]: p for p in iter_rows(tables / "pairs.parquet", PAIRS)}
    assert rows and {r["sample_id"] for r in rows} == set(pairs)
    assert any(p["aug_flip"] is not None for p in pairs.values())  # augmentation rows are there
    assert len({p["r_ij"] for p in pairs.values()}) > 1
    fields = ("r_ij", "positive_frame_id", "aug_crop", "aug_scale", "aug_flip", "aug_background", "aug_seed")
    for r in rows:
        pair = pairs[r["sample_id"]]
        assert pair["frame_id"] == r["frame_id"]
        for name in fields:
            assert r[name] == pair[name], (r["sample_id"], name)


def test_export_refuses_backgrounds_drawn_under_another_split_seed(tables):
    # pairs under one split seed: both photos in one split, so each box draws the other as background;
    # export under another seed that separates them: a background falls in the other split
    photos = ("train/0001.jpg", "train/0002.jpg")

    def together(seed):
        rule = SplitRule(heldout_fraction=0.5, seed=seed)
        return rule.of_photo(photos[0]) == rule.of_photo(photos[1])

    pairs_seed = next(s for s in range(100) if together(s))
    export_seed = next(s for s in range(100) if not together(s))
    write_images(tables, tables / "mv")
    write_images(tables, tables / "oi")
    build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet", tables,
                PairsParams(min_angle_deg=60.0, aug_background_prob=1.0),
                SplitRule(heldout_fraction=0.5, seed=pairs_seed))
    assert {p["aug_background"] for p in iter_rows(tables / "pairs.parquet", PAIRS) if p["kind"] == "augmentation"} \
        == set(photos)
    sources = SourcesParams(mvimgnet_root=str(tables / "mv"), openimages_root=str(tables / "oi"))
    with pytest.raises(ValueError, match="is not in split"):
        export_shards(frames=tables / "frames.parquet", masks=tables / "masks.parquet",
                      embeddings=tables / "embeddings.parquet", pairs=tables / "pairs.parquet",
                      pair_rejects=tables / "rejects.parquet", sources=sources, out_dir=tables / "export",
                      params=ExportParams(image_side=32, heldout_fraction=0.5, seed=export_seed, workers=1),
                      near_duplicates=near_duplicates_of(tables))


def _chunked_export(tables):
    """(params, sources, run(out_dir)): the stage on the fixture, in-process, in chunks of 5 references."""
    params = ExportParams(image_side=32, rows_per_shard=4, workers=1)
    write_images(tables, tables / "mv")
    write_images(tables, tables / "oi")
    build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet", tables,
                PairsParams(min_angle_deg=60.0), SplitRule.from_params(params))
    sources = SourcesParams(mvimgnet_root=str(tables / "mv"), openimages_root=str(tables / "oi"))

    def run(out):
        return export_shards(frames=tables / "frames.parquet", masks=tables / "masks.parquet",
                             embeddings=tables / "embeddings.parquet", pairs=tables / "pairs.parquet",
                             pair_rejects=tables / "rejects.parquet", sources=sources, out_dir=out, params=params,
                             chunk_references=5, near_duplicates=near_duplicates_of(tables))

    return params, sources, run


def test_a_failed_run_keeps_its_finished_chunks_and_the_rerun_encodes_only_the_rest(tables, monkeypatch, caplog):
    import logging

    from flows.export import shards

    params, sources, run = _chunked_export(tables)

    clean = run(tables / "clean")
    chunks = [item[0] for item, _ in shards._chunked(shards._ReferenceGroups(
        tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet", tables / "pairs.parquet",
        tables / "rejects.parquet", sources, SplitRule.from_params(params), params), 5)]
    assert max(chunks) >= 2
    third = chunks.index(2)  # the image work item that begins the third chunk
    real, encoded, failed = shards.encode_image, [], []

    def dies_in_the_third_chunk(work):
        encoded.append((work.path, tuple(m[0] for m in work.masks)))
        if len(encoded) == third + 1 and not failed:
            failed.append(True)
            raise RuntimeError("the machine went away")
        return real(work)

    monkeypatch.setattr(shards, "encode_image", dies_in_the_third_chunk)
    with pytest.raises(RuntimeError, match="went away"):
        run(tables / "out")
    work = tables / "out" / ".work"
    assert sorted(p.name for p in work.glob("*.done.json")) == ["chunk-00000.done.json", "chunk-00001.done.json"]
    before = list(encoded)
    encoded.clear()
    with caplog.at_level(logging.INFO, logger="flows.export"):
        assert run(tables / "out") == clean
    final = [r.getMessage() for r in caplog.records if r.name == "flows.export" and " samples " in r.getMessage()][-1]
    assert "(100.0%)" in final  # progress counts only the samples this run writes
    assert encoded[0] == before[third] and not set(encoded) & set(before[:third])  # finished chunks: not again
    for split in ("train", "heldout"):
        names = sorted(p.name for p in (tables / "clean" / split).glob("*.parquet"))
        assert names == sorted(p.name for p in (tables / "out" / split).glob("*.parquet"))
        for name in names:
            assert (tables / "clean" / split / name).read_bytes() == (tables / "out" / split / name).read_bytes()
    assert not work.exists()


def test_a_failure_after_the_last_chunk_loses_no_chunk_and_strays_never_reach_the_output(tables, monkeypatch):
    from flows.export import shards

    _, _, run = _chunked_export(tables)

    clean = run(tables / "clean")
    real_backgrounds = shards._write_backgrounds
    monkeypatch.setattr(shards, "_write_backgrounds", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        run(tables / "out")
    (tables / "out" / ".work" / "train" / ".part-00000.parquet.123.abc.tmp").write_bytes(b"half a shard")  # a kill -9
    monkeypatch.setattr(shards, "_write_backgrounds", real_backgrounds)
    real, encoded = shards.encode_image, []
    monkeypatch.setattr(shards, "encode_image", lambda work: (encoded.append(work), real(work))[1])
    assert run(tables / "out") == clean
    assert all(not work.masks for work in encoded)  # only the backgrounds: every chunk was kept
    for split in ("train", "heldout"):
        assert sorted(p.name for p in (tables / "out" / split).iterdir()) == sorted(
            p.name for p in (tables / "clean" / split).iterdir())
