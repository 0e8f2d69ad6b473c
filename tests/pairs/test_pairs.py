import dataclasses

import numpy as np
import pytest
from PIL import Image

from flows.config.params import PairsParams
from flows.pairs.augment import apply_recipe, make_recipe
from flows.pairs.join import iter_embeddings, iter_joined, iter_subjects
from flows.pairs.stage import build_pairs
from flows.schemas import PAIRS
from flows.splits import SplitRule
from flows.tables import iter_rows

P = PairsParams(min_angle_deg=60.0, max_positives_per_frame=3)
ALL_TRAIN = SplitRule(heldout_fraction=0.0, seed=0)


def run(tables, params=P, split=ALL_TRAIN):
    stats = build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet",
                        tables, params, split)
    return list(iter_rows(tables / "pairs.parquet", PAIRS)), stats


def test_stats_name_the_split_rule_backgrounds_were_drawn_under(tables):
    rule = SplitRule(heldout_fraction=0.2, seed=5, groups={"mvimgnet:1/aaaaaaaa": "m", "openimages:x": "m"})
    assert run(tables, split=rule)[1]["split"] == {"heldout_fraction": 0.2, "seed": 5,
                                                   "near_duplicate_grouped_units": 2}


def test_join_skips_frames_without_mask_or_embedding(tables):
    joined = list(iter_joined(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet"))
    ids = [f.frame_id for f in joined]
    assert "mvimgnet:1/aaaaaaaa/003.jpg" not in ids and "mvimgnet:1/bbbbbbbb/007.jpg" not in ids
    assert len(ids) == 16
    assert [len(g) for g in iter_subjects(iter(joined))] == [7, 7, 1, 1]


def test_multiview_pairs_same_object_and_angle(tables):
    pairs, stats = run(tables)
    multi = [p for p in pairs if p["kind"] == "multiview"]
    assert multi
    for p in multi:
        assert p["positive_frame_id"].rsplit("/", 1)[0] == p["subject_id"] == p["frame_id"].rsplit("/", 1)[0]
        assert p["positive_frame_id"] != p["frame_id"]
        if p["subject_id"].endswith("aaaaaaaa"):
            assert p["angle_deg"] >= 60.0 - 1e-4
            i, j = (int(f.rsplit("/", 1)[1][:3]) for f in (p["frame_id"], p["positive_frame_id"]))
            expected = min(abs(i - j) * 45, 360 - abs(i - j) * 45)
            assert p["angle_deg"] == pytest.approx(expected, abs=1e-3)
        else:  # no poses: fallback on the frame gap, len(frames) // 8 = 0 -> at least 1
            assert p["angle_deg"] is None and p["frame_gap"] >= 1
    assert sum(stats["angle_histogram"].values()) == sum(p["angle_deg"] is not None for p in multi)
    per_frame = {}
    for p in multi:
        per_frame[p["frame_id"]] = per_frame.get(p["frame_id"], 0) + 1
    assert max(per_frame.values()) <= 3


def test_r_ij_agrees_with_embeddings_table(tables):
    pairs, _ = run(tables)
    emb = dict(iter_embeddings(tables / "embeddings.parquet"))
    for p in pairs:
        other = p["positive_frame_id"] or p["frame_id"]
        r = float(np.dot(emb[p["frame_id"]].astype(np.float32), emb[other].astype(np.float32)))
        assert p["r_ij"] == pytest.approx(r, abs=1e-3)


def test_threshold_respected_and_deterministic(tables):
    strict, _ = run(tables, dataclasses.replace(P, min_angle_deg=170.0))
    posed = [p for p in strict if p["subject_id"].endswith("aaaaaaaa")]
    assert posed and all(p["angle_deg"] >= 170.0 - 1e-4 for p in posed)
    first, _ = run(tables)
    second, _ = run(tables)
    assert first == second


def test_augmentation_recipes_replay_exactly(tables):
    pairs, stats = run(tables)
    aug = [p for p in pairs if p["kind"] == "augmentation"]
    assert len(aug) == 2 * P.augmentations_per_box
    assert stats["pairs"]["openimages/augmentation"] == len(aug)
    for p in aug:
        assert p["aug_background"] in (None, "train/0001.jpg", "train/0002.jpg")
        assert p["aug_background"] != p["frame_id"]  # never its own photo
        x0, y0, x1, y1 = p["aug_crop"]
        assert x0 <= 0.2 + 1e-6 and y0 <= 0.2 + 1e-6 and x1 >= 0.6 - 1e-6 and y1 >= 0.7 - 1e-6
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    mask = np.zeros((80, 100), bool)
    mask[16:56, 20:60] = True
    recipe = make_recipe("f", 0, (0.2, 0.2, 0.6, 0.7), ["bg.jpg"], dataclasses.replace(P, aug_flip_prob=1.0))
    back = Image.new("RGB", (10, 10), (0, 255, 0))
    one, m1 = apply_recipe(image, mask, recipe, back if recipe.background else None)
    two, m2 = apply_recipe(image, mask, recipe, back if recipe.background else None)
    assert np.array_equal(np.asarray(one), np.asarray(two)) and np.array_equal(m1, m2)
    assert m1.sum() > 0


def test_non_contiguous_subject_is_an_error(tables):
    from flows.pairs.join import SubjectFrame

    def f(subject, index):
        return SubjectFrame(f"{subject}/{index}", subject, "mvimgnet", "cup", "p", index, None, (0, 0, 1, 1), 0.1,
                            np.zeros(2, np.float16), b"", (1, 1))
    with pytest.raises(ValueError, match="not contiguous"):
        list(iter_subjects(iter([f("a", 0), f("a", 1), f("b", 0), f("a", 2)])))


def test_frames_without_a_positive_are_rejects_with_a_reason(tables):
    from flows import reasons
    from flows.schemas import REJECTS

    pairs, stats = run(tables, dataclasses.replace(P, min_angle_deg=170.0, augmentations_per_box=0))
    rejects = {r["item_id"]: r for r in iter_rows(tables / "rejects.parquet", REJECTS)}
    # A/007's only view at 180 deg is A/003, which has no mask; OpenImages boxes get no recipe at all
    assert set(rejects) == {"mvimgnet:1/aaaaaaaa/007.jpg", "openimages:0001/k", "openimages:0002/k"}
    assert {(r["stage"], r["reason"], r["item_kind"]) for r in rejects.values()} == {("pairs", reasons.NO_POSITIVE, "frame")}
    assert "widest angle to another posed view 135.0 deg" in rejects["mvimgnet:1/aaaaaaaa/007.jpg"]["detail"]
    assert "augmentations_per_box is 0" in rejects["openimages:0001/k"]["detail"]
    joined = list(iter_joined(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet"))
    references = {p["frame_id"] for p in pairs}
    assert len(references) + len(rejects) == len(joined) and not references & set(rejects)
    assert sum(stats["frames_without_positive"].values()) == len(rejects)


def test_backgrounds_come_from_the_frames_own_split(tables):
    # seed 4, half held out: train/0001.jpg and train/0002.jpg fall in different splits
    split = SplitRule(heldout_fraction=0.5, seed=4)
    assert split.of_photo("train/0001.jpg") != split.of_photo("train/0002.jpg")
    pairs, _ = run(tables, dataclasses.replace(P, aug_background_prob=1.0, augmentations_per_box=4), split)
    aug = [p for p in pairs if p["kind"] == "augmentation"]
    assert aug and all(p["aug_background"] is None for p in aug)  # the only other photo is in the other split


def test_frame_gap_fallback_counts_the_objects_whole_capture(tables):
    # B has no poses and 8 frames here; ingest read 24 of it (16 later dropped by the filters):
    # AnyDoor's gap is len(frames) // 8 of the capture, 3, not 8 // 8 = 1
    from flows.schemas import FRAMES
    from flows.tables import write_table
    from pipeline_tables import frame

    ingested = list(iter_rows(tables / "frames.parquet", FRAMES))
    ingested += [frame(f"mvimgnet:1/bbbbbbbb/{k:03d}.jpg", "mvimgnet:1/bbbbbbbb", "mvimgnet", k) for k in range(8, 24)]
    write_table(tables / "ingested.parquet", FRAMES, ingested)
    build_pairs(tables / "frames.parquet", tables / "masks.parquet", tables / "embeddings.parquet",
                tables, P, ALL_TRAIN, tables / "ingested.parquet")
    gaps = [p["frame_gap"] for p in iter_rows(tables / "pairs.parquet", PAIRS) if p["subject_id"].endswith("bbbbbbbb")]
    assert gaps and min(gaps) >= 3
    pairs, _ = run(tables)  # without the ingest table: the frames given, gap 1
    assert min(p["frame_gap"] for p in pairs if p["subject_id"].endswith("bbbbbbbb")) == 1


def test_r_ij_is_a_cosine_even_when_float16_norms_overshoot():
    import numpy as np

    from flows.pairs.mining import cosine

    v = np.full(8, 0.3537, dtype=np.float16)  # squared norm 1.0012 after float16 rounding
    assert float(np.dot(v.astype(np.float32), v.astype(np.float32))) > 1.0
    assert cosine(v, v) == 1.0 and cosine(v, -v) == -1.0


def _asymmetric_image_and_mask():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    mask = np.zeros((30, 40), bool)
    mask[5:20, 3:15] = True  # off-centre: a flip moves it
    return image, mask


def test_flip_flips_the_mask_with_the_image():
    from flows.pairs.augment import Recipe

    image, mask = _asymmetric_image_and_mask()
    out, out_mask = apply_recipe(image, mask, Recipe((0.0, 0.0, 1.0, 1.0), 1.0, True, None, 0))
    assert np.array_equal(np.asarray(out), np.asarray(image)[:, ::-1])
    assert np.array_equal(out_mask, mask[:, ::-1])
    assert not np.array_equal(out_mask, mask)


def test_background_replaces_the_pixels_outside_the_mask():
    from flows.pairs.augment import Recipe

    image, mask = _asymmetric_image_and_mask()
    colour = (0, 255, 0)
    back = Image.new("RGB", (17, 11), colour)  # any size: it is resized to the crop
    out, out_mask = apply_recipe(image, mask, Recipe((0.0, 0.0, 1.0, 1.0), 1.0, False, "bg.jpg", 0), back)
    pixels = np.asarray(out)
    assert np.array_equal(out_mask, mask)
    assert (pixels[~mask] == colour).all()
    assert np.array_equal(pixels[mask], np.asarray(image)[mask])


def test_background_probability_decides_whether_a_background_is_drawn():
    box = (0.2, 0.2, 0.6, 0.7)
    never = dataclasses.replace(P, aug_background_prob=0.0)
    always = dataclasses.replace(P, aug_background_prob=1.0)
    for k in range(20):
        assert make_recipe(f"frame{k}", k % 3, box, ["bg.jpg"], never).background is None
        assert make_recipe(f"frame{k}", k % 3, box, ["bg.jpg"], always).background == "bg.jpg"


def test_augmentation_area_ratio_is_the_scale_squared(tables):
    pairs, _ = run(tables)
    aug = [p for p in pairs if p["kind"] == "augmentation"]
    assert aug and any(abs(p["aug_scale"] - 1.0) > 1e-3 for p in aug)
    for p in aug:
        assert p["area_ratio"] == pytest.approx(p["aug_scale"] ** 2, rel=1e-6)


def _quat_mul(a, b):
    """Hamilton product (w, x, y, z): the rotation of ``a * b`` is R(a) @ R(b)."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return (w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2)


def test_view_angle_comes_from_the_camera_axes_in_world_coordinates():
    from flows.pairs.join import SubjectFrame
    from flows.pairs.mining import mine_multiview
    from flows.readers.colmap import qvec_to_rotmat

    ay, ax = np.radians(70.0), np.radians(50.0)
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    q_y = (np.cos(ay / 2), 0.0, np.sin(ay / 2), 0.0)  # axis-angle -> unit quaternion, COLMAP (w, x, y, z)
    q_x = (np.cos(ax / 2), np.sin(ax / 2), 0.0, 0.0)
    q_xy = _quat_mul(q_x, q_y)
    rotations = [ry, rx @ ry]  # world to camera: x_cam = R x_world + t
    for q, rot in zip((q_y, q_xy), rotations):
        assert np.allclose(qvec_to_rotmat(q), rot)  # the quaternions encode these matrices
    # the camera looks down its +z: in world coordinates that axis is R^T e_z
    axes = [rot.T @ np.array([0.0, 0.0, 1.0]) for rot in rotations]
    expected = float(np.degrees(np.arccos(np.dot(axes[0], axes[1]))))
    assert expected == pytest.approx(50.0)  # Rx(50) turns the optical axis by 50 deg, whatever Ry does

    emb = np.ones(4, np.float16) / np.float16(2)
    frames = [SubjectFrame(f"mvimgnet:1/cccccccc/{k:03d}.jpg", "mvimgnet:1/cccccccc", "mvimgnet", "cup", "p", k,
                           tuple(float(v) for v in q), (0.2, 0.2, 0.6, 0.7), 0.2, emb, b"", (100, 80))
             for k, q in enumerate((q_y, q_xy))]
    pairs = mine_multiview(frames, dataclasses.replace(P, min_angle_deg=10.0))
    assert len(pairs) == 2
    for p in pairs:
        assert p["angle_deg"] == pytest.approx(expected, abs=1e-6)


def test_scale_resizes_the_subject_inside_a_frame_of_the_crops_size():
    """What the encoder sees: the subject's share of the frame changes by scale**2 (pairs' area_ratio).
    Below 1 the content is whole and the rim is ``fill``; above 1 the rim is cut and the subject kept,
    even when it sits in the crop's corner."""
    from flows.pairs.augment import Recipe

    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    mask = np.zeros((120, 160), bool)
    mask[40:80, 60:100] = True  # 1600 px, 1/12 of the frame
    whole = (0.0, 0.0, 1.0, 1.0)
    for scale in (0.5, 0.8, 1.0, 1.25):
        out, out_mask = apply_recipe(image, mask, Recipe(whole, scale, False, None, 0), fill=(7, 8, 9))
        assert out.size == image.size and out_mask.shape == mask.shape
        assert out_mask.sum() / mask.sum() == pytest.approx(scale ** 2, rel=0.08)
    small, _ = apply_recipe(image, mask, Recipe(whole, 0.5, False, None, 0), fill=(7, 8, 9))
    assert (np.asarray(small)[:5] == (7, 8, 9)).all()  # the rim
    corner = np.zeros((120, 160), bool)
    corner[:10, :10] = True
    _, kept = apply_recipe(image, corner, Recipe(whole, 1.3, False, None, 0))
    assert kept.sum() == pytest.approx(100 * 1.3 ** 2, rel=0.1)  # the cut fell on the far sides


def test_zooming_in_keeps_a_subject_in_pieces():
    """A box's centre can fall between the pieces of a mask (a strip at one edge, a speck at the
    other); the frame is anchored on a subject pixel, so a scale above 1 never cuts all of it."""
    from flows.pairs.augment import Recipe

    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    mask = np.zeros((200, 200), bool)
    mask[20:180, :20] = True
    mask[98:102, 196:200] = True
    _, kept = apply_recipe(image, mask, Recipe((0.0, 0.0, 1.0, 1.0), 1.3, False, None, 0))
    assert kept.sum() > 0.8 * 160 * 20 * 1.3 ** 2 * (1 / 1.3)  # most of the strip: the frame is 1/1.3 of it wide


def test_a_shrunk_subject_sits_on_the_unscaled_background_without_a_seam():
    from flows.pairs.augment import Recipe

    image, mask = _asymmetric_image_and_mask()
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    back = Image.fromarray(ramp)
    out, out_mask = apply_recipe(image, mask, Recipe((0.0, 0.0, 1.0, 1.0), 0.7, False, "bg.jpg", 0), back)
    expected = np.asarray(back.resize(out.size, Image.BILINEAR))
    assert out_mask.any() and np.array_equal(np.asarray(out)[~out_mask], expected[~out_mask])
