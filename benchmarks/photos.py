"""ImageNet-like JPEGs for the input-pipeline benchmarks: 500x375 by default, about 100 KB each.

Random structure at four scales plus luminance grain, so that they compress (and decode) like
photos rather than like flat colour or white noise. Deterministic per seed.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def photo_jpeg(seed: int, width: int = 500, height: int = 375, quality: int = 90, grain: float = 18.0) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 80.0), (16, 40.0), (64, 25.0), (200, 20.0)):
        small = rng.normal(size=(max(2, cells * height // width), cells, 3)).astype(np.float32)
        small8 = ((small - small.min()) / (np.ptp(small) + 1e-6) * 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(small8).resize((width, height), Image.BICUBIC), np.float32)
        img += (up - 128.0) * (amplitude / 128.0)
    img += rng.normal(0.0, grain, (height, width, 1)).astype(np.float32)
    img = np.clip(img + rng.uniform(60, 190, 3).astype(np.float32), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write(job) -> None:
    path, seed, width, height = job
    Path(path).write_bytes(photo_jpeg(seed, width, height))


def write_photo_folder(root: str | os.PathLike, n: int, classes: int = 10, width: int = 500, height: int = 375,
                       workers: int = 1) -> list[Path]:
    """`n` JPEGs in `classes` subfolders (a `folder:` dataset); existing files are kept."""
    root = Path(root)
    jobs = []
    for i in range(n):
        path = root / f"class{i % classes:03d}" / f"{i:07d}.jpg"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(path), i, width, height))
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write, jobs, chunksize=64))
    else:
        for job in jobs:
            _write(job)
    return sorted(root.glob("*/*.jpg"))
