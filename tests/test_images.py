"""runtime/images.py: PNGs get the ordinary file mode (issue 19, item 11: mkstemp's 0600 leaked)."""

from __future__ import annotations

import os
import stat

import numpy as np

from eclipse_export.runtime.images import save_png


def test_png_mode_follows_the_umask(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    old = os.umask(0o022)
    try:
        save_png(image, tmp_path / "a.png")
        os.umask(0o077)
        save_png(image, tmp_path / "b.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.png").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporaries left
