"""Shared by the picture tests: the Agg backend and a check that a rendered picture is not blank.

(The fixtures ``review_dir`` and the figure clean-up live in conftest.py.)
"""
import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402


def save_and_check(fig, path, *, min_std=0.02):
    """Write ``fig`` as PNG and check that the picture is not blank."""
    fig.savefig(path, dpi=70)
    img = mpimg.imread(path)[..., :3]
    assert img.std() > min_std, f"{path} looks blank (pixel std {img.std():.4f})"
    assert (img < 0.9).any(axis=-1).mean() > 0.01, f"{path}: almost every pixel is white"
    return img
