import numpy as np
import pytest

from flows import reasons
from flows.filtering.dedup import DuplicateIndex, multihash_layout

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


@pytest.mark.parametrize("max_hamming", [0, 1, 3, 4, 6])
def test_multihash_lookup_is_exact_against_brute_force(max_hamming):
    """Every planted neighbour within max_hamming is found and none beyond it, for each layout."""
    rng = np.random.default_rng(max_hamming)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    codes = []
    for code in base:  # each base hash, then copies flipped in 0..max_hamming+2 random bits
        codes.append(int(code))
        for flips in rng.integers(0, max_hamming + 3, size=2):
            bits = rng.choice(64, size=flips, replace=False)
            codes.append(int(code) ^ sum(1 << int(b) for b in bits))
    order = rng.permutation(len(codes))
    index = DuplicateIndex(max_hamming=max_hamming)
    accepted = []
    for n, position in enumerate(order):
        code = codes[position]
        nearest = min((bin(code ^ other).count("1") for other in accepted), default=None)
        verdict = add(index, f"{n}.jpg", f"s{n}", content=f"{n:016x}" + "0" * 48, phash=code)
        if nearest is not None and nearest <= max_hamming:
            assert verdict is not None and verdict[0] == reasons.NEAR_DUPLICATE
            assert f"distance {nearest} " in verdict[1]
        else:
            assert verdict is None
            accepted.append(code)
    assert len(index) == len(accepted)


def test_multihash_layout_keeps_buckets_wide_and_probes_few():
    nhash, bits, nflip = multihash_layout(4)
    assert (nhash, bits, nflip) == (3, 21, 1)  # 66 buckets probed, ~5 candidates each at 10M images
    for max_hamming in range(12):
        nhash, bits, nflip = multihash_layout(max_hamming)
        assert nhash * bits <= 64 and nflip == max_hamming // nhash  # pigeonhole: exact


def test_a_verdict_points_to_the_row_of_the_image_it_copies():
    index = DuplicateIndex(max_hamming=4)

    def check(path, subject, content, phash, row):
        return index.check_and_add(image_path=path, subject_id=subject, content_hash=content, phash=phash, row=row)

    assert check("a.jpg", "s1", H, 0, 7) is None
    assert check("b.jpg", "s2", "cd" * 32, 2**64 - 1, 8) is None
    assert check("c.jpg", "s3", H, 0, 9)[0] == reasons.DUPLICATE and index.matched_row == 7
    assert check("d.jpg", "s4", "ef" * 32, 2**64 - 4, 10)[0] == reasons.NEAR_DUPLICATE and index.matched_row == 8
    assert check("e.jpg", "s5", "01" * 32, 2**32 - 1, 11) is None and index.matched_row is None
    assert add(index, "f.jpg", "s6", content="02" * 32, phash=2**32 - 2)[0] == reasons.NEAR_DUPLICATE
    assert index.matched_row == 11
