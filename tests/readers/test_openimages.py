import pytest

from flows.readers import openimages as oi

BOX_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"


def write_bytes(tmp_path, name, text, *, bom=False, crlf=False):
    if crlf:
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8")
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("crlf", [False, True])
def test_boxes_bom_crlf(tmp_path, bom, crlf):
    text = f"{BOX_HEADER}\n000a1b2c3d4e5f60,xclick,/m/01g317,1,0.1,0.5,0.2,0.9,0,1,0,-1,0\n"
    rows = list(oi.iter_boxes(write_bytes(tmp_path, "b.csv", text, bom=bom, crlf=crlf)))
    assert rows == [oi.Box("000a1b2c3d4e5f60", "/m/01g317", 0.1, 0.5, 0.2, 0.9, False, True, False, None)]


def test_boxes_bad_rows_are_reported_not_skipped(tmp_path):
    text = (f"{BOX_HEADER}\n"
            "aa,xclick,/m/x,1,0.1,0.5,0.2,0.9,0,0,0,0,0\n"
            "bb,xclick,/m/x,1,0.6,0.5,0.2,0.9,0,0,0,0,0\n"  # xmin > xmax
            "cc,xclick,/m/x,1,abc,0.5,0.2,0.9,0,0,0,0,0\n"  # not a number
            "dd,xclick,/m/x,1,0.1\n"  # too few fields
            "ee,xclick,/m/x,1,0.1,0.5,0.2,0.9,0,7,0,0,0\n")  # flag out of range
    rows = list(oi.iter_boxes(write_bytes(tmp_path, "b.csv", text)))
    assert isinstance(rows[0], oi.Box)
    bad = rows[1:]
    assert all(isinstance(r, oi.BadRow) for r in bad)
    assert [r.line for r in bad] == [3, 4, 5, 6]
    assert [r.image_id for r in bad] == ["bb", "cc", "dd", "ee"]


def test_columns_found_by_name(tmp_path):
    text = "LabelName,YMax,ImageID,XMax,YMin,XMin,Extra\n/m/x,0.9,ab,0.5,0.2,0.1,zzz\n"
    (box,) = oi.iter_boxes(write_bytes(tmp_path, "b.csv", text))
    assert (box.image_id, box.xmin, box.xmax, box.ymin, box.ymax) == ("ab", 0.1, 0.5, 0.2, 0.9)
    assert box.is_group_of is None


def test_missing_column_is_a_clear_error(tmp_path):
    with pytest.raises(oi.OpenImagesFormatError, match="missing column.*XMax"):
        list(oi.iter_boxes(write_bytes(tmp_path, "b.csv", "ImageID,LabelName,XMin,YMin,YMax\n")))


def test_class_descriptions_quoted_commas_bom_crlf(tmp_path):
    text = 'LabelName,DisplayName\n/m/011k07,Tortoise\n/m/0abc,"Ball, sports"\n/m/0q,"Say ""hi"""\n'
    names = oi.read_class_descriptions(write_bytes(tmp_path, "c.csv", text, bom=True, crlf=True))
    assert names == {"/m/011k07": "Tortoise", "/m/0abc": "Ball, sports", "/m/0q": 'Say "hi"'}


@pytest.mark.parametrize("bom", [False, True])
def test_class_descriptions_without_header(tmp_path, bom):
    # oidv7-class-descriptions-boxable.csv and the V6 files have no header row
    text = '/m/011k07,Tortoise\n/g/11bc6,"Ball, sports"\n'
    names = oi.read_class_descriptions(write_bytes(tmp_path, "c.csv", text, bom=bom))
    assert names == {"/m/011k07": "Tortoise", "/g/11bc6": "Ball, sports"}


def test_class_descriptions_columns_by_name(tmp_path):
    text = "DisplayName,Extra,LabelName\nTortoise,x,/m/011k07\n"
    assert oi.read_class_descriptions(write_bytes(tmp_path, "c.csv", text)) == {"/m/011k07": "Tortoise"}


def test_class_descriptions_of_another_format_is_a_clear_error(tmp_path):
    with pytest.raises(oi.OpenImagesFormatError, match="neither a header with LabelName and DisplayName"):
        oi.read_class_descriptions(write_bytes(tmp_path, "c.csv", "id,name\n1,cup\n"))


def test_bytes_that_are_not_utf8_make_a_bad_row_not_an_abort(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(f"{BOX_HEADER}\n".encode() + b"aa,xcl\xffick,/m/x,1,0.1,0.5,0.2,0.9,0,0,0,0,0\n"
                     + b"bb,xclick,/m/x,1,0.1,0.5,0.2,0.9,0,0,0,0,0\n")
    bad, good = list(oi.iter_boxes(path))
    assert isinstance(bad, oi.BadRow) and bad.line == 2 and "not UTF-8" in bad.detail
    assert isinstance(good, oi.Box) and good.image_id == "bb"


def test_segmentation_rows(tmp_path):
    text = ("MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"
            'ab_m0k4j_1a2b3c4d.png,ab,/m/0k4j,1a2b3c4d,0.1,0.5,0.2,0.9,0.8,"0.3 0.4 1;0.5 0.5 0"\n'
            ",ab,/m/0k4j,x,0.1,0.5,0.2,0.9,0.8,\n")
    good, bad = oi.iter_segmentations(write_bytes(tmp_path, "s.csv", text))
    assert good == oi.SegmentationRow("ab_m0k4j_1a2b3c4d.png", "ab", "/m/0k4j", 0.1, 0.5, 0.2, 0.9)
    assert isinstance(bad, oi.BadRow) and "MaskPath" in bad.detail


@pytest.mark.parametrize("path", ["../x.png", "a/../../x.png", "/etc/passwd", "..\\..\\x.png", ""])
def test_mask_paths_never_leave_the_root(path):
    with pytest.raises(oi.PathOutsideRoot):
        oi.mask_relpath("ab12", path)


@pytest.mark.parametrize("image_id", ["../x", "a/b", "..\\x", "..", ""])
def test_image_ids_never_leave_the_split_folder(image_id):
    with pytest.raises(oi.PathOutsideRoot):
        oi.image_relpath("train", image_id)


def test_mask_and_image_paths():
    assert oi.mask_relpath("ab12", "ab12_m0k4j_00000001.png") == "masks/a/ab12_m0k4j_00000001.png"
    assert oi.image_relpath("train", "ab12") == "train/ab12.jpg"
