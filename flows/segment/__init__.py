"""The ``segment`` stage: one subject mask per accepted frame (the data set's own, else SAM)."""
