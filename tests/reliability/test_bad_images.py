"""Bad images: each odd-but-valid image is converted to RGB, each broken file is skipped with a
count (or named, when strict), and an image that becomes unreadable while training never ends the
epoch: the next readable image takes its place, deterministically, and is counted."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tinyclip import killed_at_call
from torch import nn

from promptkd.cli import main
from promptkd.data.dataset import ImageDataset, Item, check_image, load_rgb, scan_images
from promptkd.data.transforms import TrainTransform
from promptkd.engine import TrainConfig, train_loop
from promptkd.errors import PromptKDError


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 10-gigapixel greyscale PNG of a few hundred bytes (its rows are all zeros)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\0" * (width + 1) * 4, 9)  # a few rows only: the header is what counts
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_zoo(folder: Path) -> dict[str, str]:
    """Every kind of image file; returns name -> 'ok' or 'bad'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    rgb.save(folder / "plain.png")
    (folder / "plain.jpg").write_bytes(_jpeg(rgb))
    data = _jpeg(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero-bytes.jpg").write_bytes(b"")
    rgb.save(folder / "png-named.jpg", format="PNG")  # content decides, not the extension
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(folder / "sixteen-bit.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # pure red in CMYK
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "transparent.png")
    Image.new("LA", (8, 8), (10, 255)).save(folder / "grey-alpha.png")
    Image.new("1", (8, 8), 1).save(folder / "one-bit.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(folder / "palette-transparent.png", transparency=0)
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "notes.png").write_text("not an image at all\n")
    return {"plain.png": "ok", "plain.jpg": "ok", "truncated.jpg": "bad", "zero-bytes.jpg": "bad",
            "png-named.jpg": "ok", "sixteen-bit.png": "ok", "grey.png": "ok", "cmyk.jpg": "ok",
            "transparent.png": "ok", "grey-alpha.png": "ok", "one-bit.png": "ok", "palette-transparent.png": "ok",
            "bomb.png": "bad", "notes.png": "bad"}


def test_scan_converts_or_skips_each_file_with_a_count(tmp_path):
    zoo = write_zoo(tmp_path / "zoo")
    result = scan_images(tmp_path / "zoo")
    assert sorted(Path(p).name for p in result.paths) == sorted(n for n, v in zoo.items() if v == "ok")
    assert sorted(Path(p).name for p, _ in result.skipped) == sorted(n for n, v in zoo.items() if v == "bad")
    reasons = {Path(p).name: r for p, r in result.skipped}
    assert "decompression bomb" in reasons["bomb.png"]
    assert "not a readable image" in reasons["truncated.jpg"] and "not a readable image" in reasons["zero-bytes.jpg"]
    with pytest.raises(PromptKDError, match=r"bomb.png: .*decompression bomb"):
        scan_images(tmp_path / "zoo", strict=True)


def test_every_readable_kind_becomes_8_bit_rgb(tmp_path):
    zoo = write_zoo(tmp_path / "zoo")
    for name, verdict in zoo.items():
        path = str(tmp_path / "zoo" / name)
        if verdict == "bad":
            with pytest.raises(PromptKDError, match=name):
                load_rgb(path)
            continue
        im = load_rgb(path)
        assert im.mode == "RGB", name
    px = lambda name: load_rgb(str(tmp_path / "zoo" / name)).getpixel((0, 0))  # noqa: E731
    assert px("sixteen-bit.png") == (255, 255, 255)  # 65535 scaled, not clipped garbage
    assert px("transparent.png") == (255, 255, 255)  # transparent on white, not black
    assert px("palette-transparent.png") == (255, 255, 255)
    r, g, b = px("cmyk.jpg")
    assert r > 200 and g < 60 and b < 60  # CMYK red stays red
    assert len(set(px("grey.png"))) == 1


def test_bomb_is_refused_without_decoding(tmp_path):
    import time

    (tmp_path / "bomb.png").write_bytes(bomb_png())
    t0 = time.perf_counter()
    assert "decompression bomb" in check_image(str(tmp_path / "bomb.png"))
    with pytest.raises(PromptKDError, match="bomb.png"):
        load_rgb(str(tmp_path / "bomb.png"))
    assert time.perf_counter() - t0 < 2.0


# ------------------------------------------------------------------------------ during training


def _images(folder: Path, n: int = 12) -> list[Item]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        items.append(Item(str(folder / f"{i}.png"), i % 3))
    return items


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _train(items, out, **cfg_kw):
    model = _Tiny()
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 0.1, "warmup_epochs": 0, "progress": False, **cfg_kw})
    ds = ImageDataset(items, TrainTransform(size=16), seed=3, train=True)
    res = train_loop(model, lambda b: (nn.functional.cross_entropy(model(b[0]), b[1]), {}), ds, cfg, out)
    return model, res


def test_image_broken_after_listing_does_not_end_the_epoch(tmp_path):
    items = _images(tmp_path / "img")
    Path(items[5].path).write_bytes(b"")  # deleted/truncated while the run was going
    shutil.copy(items[0].path, items[7].path + ".bak")
    Path(items[7].path).write_bytes(Path(items[7].path + ".bak").read_bytes()[:40])  # truncated PNG
    model, res = _train(items, tmp_path / "run")
    assert len(res.history) == 2 and res.history[-1]["unreadable_images"] == 2
    again, _ = _train(items, tmp_path / "again")
    assert torch.equal(model.fc.weight, again.fc.weight)  # the substitution is deterministic

    with pytest.raises(PromptKDError, match=r"/[57].png: cannot read image"):
        _train(items, tmp_path / "strict", on_bad_image="error")


def test_substitute_is_the_next_readable_item(tmp_path):
    items = _images(tmp_path / "img", n=7)
    bad = {1, 2, 5, 6}
    for i in bad:
        Path(items[i].path).write_bytes(b"")
    pixels = lambda img: torch.from_numpy(np.asarray(img).copy())  # noqa: E731
    ds = ImageDataset(items, pixels, train=False, on_bad_image="substitute")
    for i in range(7):
        j = next((i + k) % 7 for k in range(7) if (i + k) % 7 not in bad)  # i, i+1, i+2, ... wrapping
        image, label, used = ds[i]
        assert used == j and label == items[j].label, (i, used)
        assert torch.equal(image, torch.from_numpy(np.asarray(Image.open(items[j].path).convert("RGB")).copy()))
    assert [ds[i][2] for i in range(7)] == [0, 3, 3, 3, 4, 0, 0]
    assert ds.unreadable_count() == 4

    none = ImageDataset([Item("/nonexistent/a.png", 0), Item("/nonexistent/b.png", 1)], TrainTransform(size=16))
    with pytest.raises(PromptKDError, match="none of the 2 images"):
        none[0]


def test_unreadable_images_met_by_workers_are_counted(tmp_path):
    items = _images(tmp_path / "img")
    Path(items[2].path).write_bytes(b"")
    _, res = _train(items, tmp_path / "run", num_workers=2, epochs=1)
    assert res.history[-1]["unreadable_images"] == 1


def test_resume_with_an_unreadable_image_is_still_exact(tmp_path):
    items = _images(tmp_path / "img")
    Path(items[5].path).write_bytes(b"")
    ref, _ = _train(items, tmp_path / "ref", checkpoint_every=1)

    import promptkd.engine.loop as loop

    with killed_at_call(loop, "save_checkpoint", 4, after=True):
        _train(items, tmp_path / "run", checkpoint_every=1)
    model = _Tiny()
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.1, warmup_epochs=0, progress=False, checkpoint_every=1)
    ds = ImageDataset(items, TrainTransform(size=16), seed=3, train=True)
    train_loop(model, lambda b: (nn.functional.cross_entropy(model(b[0]), b[1]), {}), ds, cfg, tmp_path / "run",
               resume=True)
    assert torch.equal(model.fc.weight, ref.fc.weight)


def test_distill_on_a_split_file_with_a_corrupt_image_finishes_and_counts_it(world, tmp_path, capsys):
    """CoOp-style split files are only checked for existence: a corrupt JPEG is met in training.

    Training goes on and counts it; evaluation refuses to score a test split it cannot read.
    """
    root = tmp_path / "images"
    shutil.copytree(world.data / "train", root)
    entries = [[f"{c.name}/{p.name}", i, c.name] for i, c in enumerate(sorted(root.iterdir()))
               for p in sorted(c.iterdir())]
    (root / "red" / "0.png").write_bytes((root / "red" / "0.png").read_bytes()[:60])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": entries, "val": [], "test": entries[:4]}))
    args = world.distill_args(tmp_path / "run", "--epochs", "1", "--root", str(root))
    args[args.index("--dataset") + 1] = f"split:{split}"
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][-1]["unreadable_images"] == 1
    capsys.readouterr()

    split.write_text(json.dumps({"train": entries, "val": [], "test": entries}))
    code = main(["eval", "--dataset", f"split:{split}", "--root", str(root), "--protocol", "cross",
                 "--student", str(tmp_path / "run" / "student.safetensors"), "--student-model",
                 str(world.student_cfg), "--student-weights", str(world.student_weights), "--class-vectors",
                 str(tmp_path / "run" / "class_vectors.safetensors"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "red/0.png: cannot read image" in err, err
