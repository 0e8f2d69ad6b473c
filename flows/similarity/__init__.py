"""The similarity stage's compute core: exact top-k cosine neighbours (frames and subject
means), near-duplicate flags across subjects, and hard-negative lists. Plain functions; the
Prefect flow and DVC stage wrap them.

- topk.py: ``topk_cosine`` (numpy in/out, faiss on CPU, torch on GPU) and ``topk_cosine_torch``.
- subjects.py: streaming mean embedding per subject, renormalised; subject codes of frames.
- mining.py: neighbour tables (i, j, r, near_duplicate), near-duplicate subject pairs,
  hard negatives per subject.
"""
