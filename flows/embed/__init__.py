"""The ``embed`` stage: CLIP appearance embeddings of the segmented subjects (MACL's r_ij source)."""
