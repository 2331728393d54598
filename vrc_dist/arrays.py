"""Array checks shared by every reader of vectors (candidates, prototypes, queries, imported tensors)."""
from __future__ import annotations

import numpy as np


def nonfinite_rows(a) -> np.ndarray:
    """Indices of the rows of a 2-D array that hold a NaN or an inf."""
    return np.flatnonzero(~np.isfinite(np.asarray(a)).all(axis=1))
