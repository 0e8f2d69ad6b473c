"""flows.ingest.check: the source paths, checked before any shard is planned."""

import pytest

from flows.config.params import SourcesParams
from flows.errors import UserFacingError
from flows.ingest.check import SourceError, check_source_files


@pytest.fixture
def roots(tmp_path):
    mv, masks, oi = tmp_path / "mv", tmp_path / "mv_masks", tmp_path / "oi"
    for folder in (mv, masks, oi):
        folder.mkdir()
    (mv / "cats.txt").write_text("5,teapot\n")
    (oi / "boxes.csv").write_text("ImageID\n")
    (oi / "seg.csv").write_text("MaskPath\n")
    (oi / "classes.csv").write_text("LabelName,DisplayName\n/m/01,cup\n")
    return SourcesParams(mvimgnet_root=str(mv), mvimgnet_mask_root=str(masks), mvimgnet_categories=str(mv / "cats.txt"),
                         openimages_root=str(oi), openimages_boxes_csv="boxes.csv",
                         openimages_segmentation_csv="seg.csv", openimages_classes_csv="classes.csv")


def test_good_paths_pass(roots):
    check_source_files(roots)


def test_every_bad_path_is_named_in_one_error(roots, tmp_path):
    import dataclasses

    bad = dataclasses.replace(roots, mvimgnet_mask_root=str(tmp_path / "mv_mask"),  # one letter short
                              mvimgnet_categories=str(tmp_path / "nope.txt"), openimages_boxes_csv="bbox.csv")
    (tmp_path / "oi" / "classes.csv").write_text("id,name\n1,cup\n")
    with pytest.raises(SourceError) as caught:
        check_source_files(bad)
    message = str(caught.value)
    assert isinstance(caught.value, UserFacingError) and "\n" not in message
    for key in ("sources.mvimgnet_mask_root", "sources.mvimgnet_categories", "sources.openimages_boxes_csv",
                "sources.openimages_classes_csv"):
        assert key in message
    assert "mv_mask is not a folder" in message and "neither a header with LabelName and DisplayName" in message


def test_disabled_sources_are_not_checked(roots, tmp_path):
    import dataclasses

    check_source_files(dataclasses.replace(roots, enabled=["openimages"], mvimgnet_root=str(tmp_path / "gone")))
