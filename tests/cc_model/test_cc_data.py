"""The training loader over the export stage's shards (cc_model.data): positives, targets, r_ij, order."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cc_model.backbones import clip_tokenizer_from_open_clip
from cc_model.data import (
    ExportDataError,
    ExportDataset,
    RowGroups,
    SubjectBatchSampler,
    hard_negative_lists,
    pad_square,
    subject_bbox,
    target_view,
    to_tensor,
)
from flows.embed.preprocess import decode_rle, segment_subject
from flows.pairs.augment import Recipe, apply_recipe
from flows.schemas import BACKGROUNDS, EXPORT, HARD_NEGATIVES, embeddings_schema
from flows.tables import fixed_size_list_to_numpy, iter_rows, write_table

BACKGROUND = (124, 116, 104)


def make_dataset(tables, **kwargs) -> ExportDataset:
    tokenizer = clip_tokenizer_from_open_clip()
    (sks,) = tokenizer("sks", add_special_tokens=False).input_ids
    options = dict(embeddings=tables / "embeddings.parquet", tokenizer=tokenizer, placeholder_id=sks,
                   pixel_size=32, image_size=24, background_rgb=BACKGROUND) | kwargs
    return ExportDataset(tables / "export", "train", **options)


def rows_of(tables):
    return [r for p in sorted((tables / "export" / "train").glob("*.parquet")) for r in iter_rows(p, EXPORT)]


def decoded(row):
    image = Image.open(io.BytesIO(row["image_jpeg"])).convert("RGB")
    return image, decode_rle(row["mask_rle"], width=row["width"], height=row["height"])


def test_multiview_positive_is_the_positive_frames_row(exported):
    dataset, rows = make_dataset(exported), rows_of(exported)
    by_frame = {r["frame_id"]: r for r in rows}
    checked = 0
    for i, row in enumerate(rows):
        if row["positive_frame_id"] is None:
            continue
        image, mask = dataset.image_and_mask(i)
        positive, positive_mask = dataset.positive(i, image, mask)
        expected, expected_mask = decoded(by_frame[row["positive_frame_id"]])
        assert np.array_equal(np.asarray(positive), np.asarray(expected))
        assert np.array_equal(positive_mask, expected_mask)
        x_hat = segment_subject(expected, expected_mask, subject_bbox(expected_mask), BACKGROUND)  # another view, cut out
        torch.testing.assert_close(dataset[i]["positive"], to_tensor(x_hat.resize((24, 24), Image.BICUBIC)))
        checked += 1
    assert checked >= 8


def test_augmentation_positive_replays_the_recipe_with_its_background(exported):
    dataset, rows = make_dataset(exported), rows_of(exported)
    photos = {r["image_path"]: r["image_jpeg"] for r in iter_rows(exported / "export" / "backgrounds.parquet",
                                                                   BACKGROUNDS)}
    augmented = [(i, r) for i, r in enumerate(rows) if r["positive_frame_id"] is None]
    assert augmented and any(r["aug_background"] for _, r in augmented)  # both kinds of recipe are covered
    for i, row in augmented:
        image, mask = decoded(row)
        recipe = Recipe(tuple(row["aug_crop"]), row["aug_scale"], row["aug_flip"], row["aug_background"],
                        row["aug_seed"])
        back = Image.open(io.BytesIO(photos[recipe.background])) if recipe.background else None
        expected, expected_mask = apply_recipe(image, mask, recipe, back, fill=BACKGROUND)
        positive, positive_mask = dataset.positive(i, *dataset.image_and_mask(i))
        assert np.array_equal(np.asarray(positive), np.asarray(expected))
        assert np.array_equal(positive_mask, expected_mask)
        item = dataset[i]  # the image encoder sees the whole recipe image: its crop, scale, flip, background
        framed = pad_square(expected, BACKGROUND)
        torch.testing.assert_close(item["positive"], to_tensor(framed.resize((24, 24), Image.BICUBIC)))
        # not the reference again: cut to the box and painted, only the flip would remain
        reference = item["reference"].flip(-1) if recipe.flip else item["reference"]
        assert (item["positive"] - reference).abs().mean() > 0.02


def test_pad_square_centres_the_whole_image():
    image = Image.fromarray(np.full((4, 10, 3), 200, dtype=np.uint8))
    square = np.asarray(pad_square(image, BACKGROUND))
    assert square.shape == (10, 10, 3)
    assert (square[3:7] == 200).all() and (square[:3] == BACKGROUND).all() and (square[7:] == BACKGROUND).all()


def test_item_shapes_ranges_and_placeholder(exported):
    dataset = make_dataset(exported)
    sks = dataset.placeholder_id
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["target"].shape == (3, 32, 32) and -1 <= item["target"].min() <= item["target"].max() <= 1
        assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
        assert item["reference"].shape == item["positive"].shape == (3, 24, 24)
        assert int(item["input_ids"][dataset.row(i)["placeholder_index"]]) == sks


def test_batch_appearance_similarity_is_the_embedding_cosines_and_matches_r_ij(exported):
    dataset, rows = make_dataset(exported), rows_of(exported)
    table = pq.read_table(exported / "embeddings.parquet")
    vectors = dict(zip(table["frame_id"].to_pylist(), fixed_size_list_to_numpy(table["embedding"]).astype(np.float64)))
    picked = [0, 3, 5, len(rows) - 1]
    batch = dataset.collate([dataset[i] for i in picked])
    ids = [rows[i]["embedding_id"] for i in picked] + [rows[i]["positive_embedding_id"] for i in picked]
    z = np.stack([vectors[f] / np.linalg.norm(vectors[f]) for f in ids])
    np.testing.assert_allclose(batch["appearance_sim"].numpy(), z @ z.T, atol=1e-5)
    b = len(picked)
    for k, i in enumerate(picked):  # the reference/positive cosine is the pairs stage's r_ij
        assert abs(float(batch["appearance_sim"][k, b + k]) - rows[i]["r_ij"]) < 1e-3
    assert batch["target"].shape == (b, 3, 32, 32) and batch["input_ids"].shape == (b, 77)


def test_target_view_keeps_the_subject_of_a_wide_image():
    image = Image.new("RGB", (120, 40), (0, 0, 0))
    mask = np.zeros((40, 120), dtype=bool)
    mask[10:30, 100:116] = True  # near the right border: a centre crop would lose it
    image.paste((255, 0, 0), (100, 10, 116, 30))
    square, square_mask = target_view(image, mask, 20)
    assert square.size == (20, 20) and square_mask.shape == (20, 20)
    assert square_mask.sum() == pytest.approx(mask.sum() * (20 / 40) ** 2, rel=0.15)
    assert np.asarray(square)[square_mask][:, 0].min() > 200  # the subject's pixels are under its mask


def sampler_case(**kwargs):
    """8 row groups of 16 rows; 12 subjects of 6 to 16 rows, spread over the groups."""
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(12), rng.integers(6, 17, size=12))
    subjects = subjects[: 8 * 16] if len(subjects) >= 128 else np.resize(subjects, 128)
    groups = [range(16 * g, 16 * (g + 1)) for g in range(8)]
    return SubjectBatchSampler(groups, subjects, **{"batch_size": 4, "seed": 3, "window_groups": 2, **kwargs}), subjects


def test_batches_hold_distinct_subjects_and_no_near_duplicates():
    conflicts = {0: {1}, 1: {0}, 5: {7}, 7: {5}}
    sampler, subjects = sampler_case(conflicts=conflicts)
    batches = list(sampler)
    assert batches and all(len(b) == 4 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and len(seen) + sampler.left_out == len(subjects)  # nothing counted twice
    assert sampler.left_out < len(subjects) // 4
    for batch in batches:
        codes = [int(subjects[i]) for i in batch]
        assert len(set(codes)) == 4  # another view of the same subject is no negative
        assert not any(b in conflicts.get(a, ()) for a in codes for b in codes)


def test_batch_order_is_deterministic_local_and_resumable():
    sampler, _ = sampler_case()
    first = list(sampler)
    assert list(sampler_case()[0]) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start=5)
    assert list(sampler) == first[5:] and len(sampler) == len(first) - 5
    mixed = SubjectBatchSampler([range(16 * g, 16 * (g + 1)) for g in range(8)], np.arange(128) % 12,
                                batch_size=4, seed=3, window_groups=2)
    window = {i // 16 for b in list(mixed)[:4] for i in b}
    assert len(window) == 2  # with enough subjects per window, its batches stay in its two row groups


def hard_pairs(batch, subjects, negatives) -> int:
    codes = [int(subjects[i]) for i in batch]
    return sum(1 for a in codes for b in codes if b in negatives.get(a, ()))


def test_hard_negatives_join_batches_without_breaking_the_rules():
    negatives = {s: [(s + 5) % 12, (s + 6) % 12] for s in range(12)}
    conflicts = {0: {5}, 5: {0}}  # 5 is 0's hardest negative, but a near-duplicate: never beside it
    plain, subjects = sampler_case(conflicts=conflicts)
    # n = 0: the batches the sampler dealt before hard negatives existed (b477517)
    digest = hashlib.sha256(json.dumps(list(sampler_case(conflicts=conflicts, hard_negatives=negatives)[0])).encode())
    assert digest.hexdigest()[:16] == "a3b7dc3b5d362d80" and list(plain)[:2] == [[125, 115, 99, 36], [127, 108, 107, 16]]
    sampler, _ = sampler_case(conflicts=conflicts, hard_negatives=negatives, hard_per_batch=1)
    batches = list(sampler)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and len(seen) + sampler.left_out == len(subjects)  # each row once at most
    assert sampler.left_out < len(subjects) // 4
    for batch in batches:
        codes = [int(subjects[i]) for i in batch]
        assert len(set(codes)) == 4 and not any(b in conflicts.get(a, ()) for a in codes for b in codes)
    with_hard = sum(hard_pairs(b, subjects, negatives) > 0 for b in batches)
    without = sum(hard_pairs(b, subjects, negatives) > 0 for b in plain)
    assert len(sampler.hard_counts) == len(batches) and set(sampler.hard_counts) <= {0, 1}
    hard_rows = sum(sampler.hard_counts)
    assert 0 < hard_rows and with_hard >= hard_rows > without / 2
    assert with_hard > without
    again, _ = sampler_case(conflicts=conflicts, hard_negatives=negatives, hard_per_batch=1)
    assert list(again) == batches  # deterministic in (seed, epoch)
    from cc_model.training import RankBatches, Ranks

    shares = RankBatches(sampler, Ranks(1, 3))  # 3 processes take 24 of the 25 batches: the last is nobody's
    assert shares.hard_rows() == hard_rows - sampler.hard_counts[-1] and len(batches) % 3 == 1
    with pytest.raises(ValueError, match="hard_per_batch must be in"):
        sampler_case(hard_negatives=negatives, hard_per_batch=4)


def test_hard_negatives_are_drawn_from_the_window_being_dealt_when_it_has_them():
    subjects = np.tile(np.arange(8), 8)  # row 8g + s is subject s: every subject has a row in every group
    groups = [range(8 * g, 8 * (g + 1)) for g in range(8)]
    negatives = {s: [(s + 1) % 8] for s in range(8)}
    one_group = total = 0
    for seed in range(10):
        sampler = SubjectBatchSampler(groups, subjects, batch_size=4, seed=seed, window_groups=1,
                                      hard_negatives=negatives, hard_per_batch=1)
        batches = sampler.batches()
        assert sum(sampler.hard_counts) >= len(batches) - 2
        one_group += sum(len({r // 8 for r in b}) == 1 for b in batches)  # no read outside the window
        total += len(batches)
    assert one_group / total > 0.4  # drawn from anywhere: 14 of 156 batches stayed in one group


def test_hard_negative_lists_keep_this_splits_subjects_hardest_first(tmp_path):
    rows = [{"subject_id": "a", "negative_subject_id": n, "rank": k, "r": 0.9 - k / 10}
            for k, n in reversed(list(enumerate(["c", "x", "b"])))]  # x: of the other split
    rows.append({"subject_id": "x", "negative_subject_id": "a", "rank": 0, "r": 0.9})
    write_table(tmp_path / "hard_negatives.parquet", HARD_NEGATIVES, rows)
    names = pa.array(["a", "b", "c"])
    assert hard_negative_lists(tmp_path / "hard_negatives.parquet", names) == {0: [2, 1]}


def test_too_few_subjects_for_a_batch_fail_clearly():
    with pytest.raises(ExportDataError, match="3 subjects, fewer than train.batch_size \\(4\\)"):
        SubjectBatchSampler([range(6)], np.array([0, 0, 1, 1, 2, 2]), batch_size=4, seed=0)


def test_row_groups_read_across_groups_and_pickle_without_handles(exported):
    files = sorted((exported / "export" / "train").glob("*.parquet"))
    rows = RowGroups(files, EXPORT, ["frame_id"], cache_groups=1)
    expected = [r["frame_id"] for r in rows_of(exported)]
    assert len(rows) == len(expected) and len(rows.groups) >= 2
    assert [rows.row(i)["frame_id"] for i in reversed(range(len(rows)))] == expected[::-1]
    clone = pickle.loads(pickle.dumps(rows))
    assert clone._handles == {} and clone.row(0)["frame_id"] == expected[0]
    with pytest.raises(IndexError):
        rows.row(len(rows))


def test_bad_shards_fail_naming_what_to_rerun(exported, tmp_path):
    with pytest.raises(ExportDataError, match="no shards.*dvc repro export"):
        ExportDataset(tmp_path, "train", embeddings=exported / "embeddings.parquet", tokenizer=None,
                      placeholder_id=0, pixel_size=32, image_size=24, background_rgb=BACKGROUND)
    partial = tmp_path / "embeddings.parquet"  # every embedding but the first reference's
    rows = rows_of(exported)
    table = pq.read_table(exported / "embeddings.parquet")
    keep = [r for r in table.to_pylist() if r["frame_id"] != rows[0]["embedding_id"]]
    write_table(partial, embeddings_schema(8), keep)
    with pytest.raises(ExportDataError, match=f"no embedding for 1 .*{rows[0]['embedding_id']}"):
        make_dataset(exported, embeddings=partial)


def _rewrite_first_row(export_dir, **values):
    part = sorted((export_dir / "export" / "train").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    for name, value in values.items():
        column = table[name].to_pylist()
        column[0] = value
        field = table.schema.field(name)  # its type, nullability and the schema's metadata kept
        table = table.set_column(table.schema.get_field_index(name), field, pa.array(column, field.type))
    pq.write_table(table, part)


def test_a_wrong_placeholder_index_is_refused_before_training(exported):
    """Checked for every distinct caption when the dataset is built, not at the step that reaches it."""
    _rewrite_first_row(exported, placeholder_index=1)
    with pytest.raises(ExportDataError, match="placeholder_index 1 does not point at the placeholder"):
        make_dataset(exported)


def test_a_caption_too_long_for_the_model_is_refused_before_training(exported):
    """The model's tokenizer would cut it (and the class name with it) at 77 tokens."""
    _rewrite_first_row(exported, caption="a photo of a sks " + "salt & pepper " * 30 + "shaker")
    with pytest.raises(ExportDataError, match="tokens for the model's tokenizer, over its 77"):
        make_dataset(exported)


def test_shards_that_lost_a_positive_or_a_background_are_refused(exported):
    import pyarrow.compute as pc

    train = exported / "export" / "train"
    rows = rows_of(exported)
    lost = next(r["positive_frame_id"] for r in rows if r["positive_frame_id"])
    for path in sorted(train.glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.not_equal(table["frame_id"], lost)), path)
    with pytest.raises(ExportDataError, match=f"positives are not frames of the split, e.g. {lost}"):
        make_dataset(exported)

    no_photos = pq.read_table(exported / "export" / "backgrounds.parquet").slice(0, 0)
    pq.write_table(no_photos, exported / "export" / "backgrounds.parquet")
    for path in sorted(train.glob("*.parquet")):  # only augmentation rows left: their backgrounds are gone
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.is_null(table["positive_frame_id"])), path)
    with pytest.raises(ExportDataError, match="no photo .* that a recipe names"):
        make_dataset(exported)


def test_reference_target_and_mask_come_from_the_reference_row(exported):
    dataset, rows = make_dataset(exported), rows_of(exported)
    for i in (0, len(rows) - 1):
        image, mask = decoded(rows[i])
        item = dataset[i]
        x_hat = segment_subject(image, mask, subject_bbox(mask), BACKGROUND)
        torch.testing.assert_close(item["reference"], to_tensor(x_hat.resize((24, 24), Image.BICUBIC)))
        target, target_mask = target_view(image, mask, 32)
        torch.testing.assert_close(item["target"], to_tensor(target) * 2 - 1)
        assert torch.equal(item["mask"][0], torch.from_numpy(target_mask.astype(np.float32)))
        assert target_mask.any() and not target_mask.all()  # the subject, not the frame
