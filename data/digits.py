"""scikit-learn's bundled digits: the embedded default dataset, no download."""

from __future__ import annotations

import numpy as np

from .dataset import LabeledData


def load_digits() -> LabeledData:
    """Load the 1,797 8x8 handwritten digits shipped inside scikit-learn.

    Pixels (0..16) are scaled to [0, 1] and given a channel axis so the CNN
    sees ``(8, 8, 1)`` images. The data is the UCI "Optical Recognition of
    Handwritten Digits" test set (Alpaydin & Kaynak, 1998), written by 13
    people; scikit-learn does not ship writer ids, so no natural split exists.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., np.newaxis]
    y = bunch.target.astype(np.int64)
    return LabeledData(x=x, y=y, num_classes=10, kind="image", name="digits")
