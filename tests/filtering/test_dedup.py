from flows import reasons
from flows.filtering.dedup import DuplicateIndex

H = "ab" * 32


def add(index, path, subject, content=H, phash=0x0123456789ABCDEF):
    return index.check_and_add(image_path=path, subject_id=subject, content_hash=content, phash=phash)


def test_exact_and_near_duplicates_across_subjects():
    index = DuplicateIndex(max_hamming=4)
    assert add(index, "a.jpg", "s1") is None
    exact = add(index, "b.jpg", "s2")
    assert exact[0] == reasons.DUPLICATE and "abababab" in exact[1]
    near = add(index, "c.jpg", "s3", content="cd" * 32, phash=0x0123456789ABCDEF ^ 0b1011)
    assert near[0] == reasons.NEAR_DUPLICATE and "distance 3" in near[1]
    far = add(index, "d.jpg", "s4", content="ef" * 32, phash=0x0123456789ABCDEF ^ 0b11111)
    assert far is None  # distance 5 > 4
    assert len(index) == 2  # rejected images are not indexed


def test_same_subject_is_never_a_duplicate():
    index = DuplicateIndex(max_hamming=4)
    assert add(index, "obj/001.jpg", "obj") is None
    assert add(index, "obj/002.jpg", "obj", content="cd" * 32, phash=0x0123456789ABCDEF ^ 1) is None


def test_boxes_of_one_image_share_the_verdict():
    index = DuplicateIndex(max_hamming=4)
    assert add(index, "img1.jpg", "box1") is None
    assert add(index, "img1.jpg", "box2") is None  # same image, other box: not a duplicate
    assert add(index, "img2.jpg", "box3")[0] == reasons.DUPLICATE
    assert add(index, "img2.jpg", "box4")[0] == reasons.DUPLICATE


def test_hamming_zero_means_identical_hash_only():
    index = DuplicateIndex(max_hamming=0)
    assert add(index, "a.jpg", "s1", phash=1) is None
    assert add(index, "b.jpg", "s2", content="cd" * 32, phash=3) is None
    assert add(index, "c.jpg", "s3", content="ef" * 32, phash=1)[0] == reasons.NEAR_DUPLICATE
