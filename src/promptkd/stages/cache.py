"""Teacher-output cache: the teacher's image features for K replayable augmented views per image.

The frozen teacher's image tower dominates a distillation step once class vectors are pre-stored
(official-promptkd.md section 7). Its output for a given crop never changes, so we run it once:
for each unlabelled image we draw K views (crop box + flip, recorded as in FKD and MobileCLIP's
reinforced datasets), store the teacher's normalised features in fp16, and distillation replays a
stored view for the student. Features, not logits, are stored, so one cache serves any seed,
student, KD setting or class list of the same teacher.

On disk: `manifest.json` plus shards `shard-00000.safetensors` (features (n, K, D) fp16, views
(n, K, 5) int32 as top, left, h, w, flip). Shards are written atomically and listed in the
manifest as they finish, so an interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from promptkd.artifacts import load_artifact, read_json, save_artifact, write_json
from promptkd.data.dataset import Item, augmentation_seed, load_rgb
from promptkd.data.transforms import TrainTransform, View, sample_view
from promptkd.errors import PromptKDError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def items_digest(items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    for path, _ in items:
        h.update(str(path).encode() + b"\0")
    return h.hexdigest()[:16]


def view_generator(seed: int, view: int, index: int) -> torch.Generator:
    """View k of image i is drawn from (seed, k, i) alone: reproducible and order-independent."""
    return torch.Generator().manual_seed(augmentation_seed(seed, 1_000_000 + view, index))


class _ViewRenderer(Dataset):
    """Renders the K views of each image of one shard with the teacher's transform."""

    def __init__(self, items, indices, transform: TrainTransform, views: int, seed: int):
        self.items, self.indices, self.transform, self.views, self.seed = items, indices, transform, views, seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        img = load_rgb(self.items[i][0])
        tensors, boxes = [], []
        for k in range(self.views):
            v = sample_view(img.width, img.height, view_generator(self.seed, k, i), self.transform.scale, self.transform.ratio)
            tensors.append(self.transform.apply_view(img, v))
            boxes.append([v.top, v.left, v.h, v.w, int(v.flip)])
        return torch.stack(tensors), torch.tensor(boxes, dtype=torch.int32)


@dataclass
class CacheSpec:
    views: int = 8
    seed: int = 0
    shard_size: int = 1024
    batch_size: int = 64  # images per teacher forward
    num_workers: int = 0


@torch.no_grad()
def build_teacher_cache(teacher, items: Sequence[Item], transform: TrainTransform, out_dir: str | Path,
                        spec: CacheSpec | None = None, *, device: str | torch.device = "cpu",
                        precision: str = "fp32", progress: bool = True) -> Path:
    """Run the teacher image tower once over K views of every image; resumable. Returns the cache dir."""
    from tqdm.auto import tqdm

    from promptkd.engine.loop import autocast

    spec = spec or CacheSpec()
    if spec.views < 1 or spec.shard_size < 1:
        raise PromptKDError("cache views and shard size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)
    header = {
        "kind": "teacher_cache", "version": CACHE_VERSION, "teacher": teacher.identity(),
        "views": spec.views, "seed": spec.seed, "n_images": len(items), "items_digest": items_digest(items),
        "dim": teacher.dim, "dtype": "float16", "shard_size": spec.shard_size,
        "transform": {"size": transform.size, "scale": list(transform.scale), "ratio": list(transform.ratio),
                      "mean": transform.mean, "std": transform.std},
    }
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.exists():
        old = read_json(manifest_path)
        same = {k: v for k, v in old.items() if k != "shards"} == header
        if not same:
            raise PromptKDError(f"{out}: holds a cache for another teacher, image list or settings; use a new folder")
        shards = [s for s in old.get("shards", []) if (out / s["file"]).is_file()]
    done = {s["start"] for s in shards}
    n_shards = math.ceil(len(items) / spec.shard_size)
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    bar = tqdm(total=len(items) * spec.views, desc="teacher cache", unit="view", disable=not progress, dynamic_ncols=True)
    bar.update(sum(s["end"] - s["start"] for s in shards) * spec.views)
    for s in range(n_shards):
        start, end = s * spec.shard_size, min((s + 1) * spec.shard_size, len(items))
        if start in done:
            continue
        loader = DataLoader(_ViewRenderer(items, list(range(start, end)), transform, spec.views, spec.seed),
                            batch_size=max(1, spec.batch_size // spec.views), num_workers=spec.num_workers)
        feats, boxes = [], []
        for images, b in loader:
            n = images.shape[0]
            with autocast(device, precision):
                f = teacher.encode_images(images.flatten(0, 1).to(device))
            feats.append(f.float().view(n, spec.views, -1).half().cpu())
            boxes.append(b)
            bar.update(n * spec.views)
        name = f"shard-{s:05d}.safetensors"
        save_artifact(out / name, {"features": torch.cat(feats), "views": torch.cat(boxes)},
                      {"kind": "teacher_cache_shard", "start": start, "end": end})
        shards.append({"file": name, "start": start, "end": end})
        write_json(manifest_path, {**header, "shards": sorted(shards, key=lambda d: d["start"])})
    bar.close()
    if not shards and not items:
        write_json(manifest_path, {**header, "shards": []})
    return out


class TeacherCache:
    """A built cache, loaded into memory (fp16 features: N x K x D x 2 bytes)."""

    def __init__(self, cache_dir: str | Path, teacher_identity: dict | None = None, items: Sequence[Item] | None = None):
        d = Path(cache_dir)
        m = read_json(d / "manifest.json")
        if m.get("kind") != "teacher_cache":
            raise PromptKDError(f"{d}: not a teacher cache (manifest kind {m.get('kind')!r})")
        if teacher_identity is not None:
            for key in ("clip", "prompts_hash"):
                if m["teacher"].get(key) != teacher_identity.get(key):
                    raise PromptKDError(f"{d}: cache was built by another teacher ({key}: cache has "
                                        f"{m['teacher'].get(key)}, this teacher has {teacher_identity.get(key)})")
        if items is not None and (len(items) != m["n_images"] or items_digest(items) != m["items_digest"]):
            raise PromptKDError(f"{d}: cache was built for another image list ({m['n_images']} images)")
        covered = sum(s["end"] - s["start"] for s in m["shards"])
        if covered != m["n_images"]:
            raise PromptKDError(f"{d}: cache is incomplete ({covered}/{m['n_images']} images); rerun the build to resume")
        self.manifest, self.views, self.dim = m, int(m["views"]), int(m["dim"])
        feats, views = [], []
        for s in sorted(m["shards"], key=lambda s: s["start"]):
            t, _ = load_artifact(d / s["file"], kind="teacher_cache_shard")
            feats.append(t["features"])
            views.append(t["views"])
        self.features = torch.cat(feats) if feats else torch.empty(0, self.views, self.dim, dtype=torch.float16)
        self.boxes = torch.cat(views) if views else torch.empty(0, self.views, 5, dtype=torch.int32)

    def view(self, index: int, k: int) -> View:
        t, left, h, w, flip = (int(x) for x in self.boxes[index, k])
        return View(t, left, h, w, bool(flip))


class CachedViewDataset(Dataset):
    """Distillation inputs from a cache: (student view tensor, teacher feature, index).

    Each epoch replays one stored view per image, chosen from (seed, epoch, index).
    """

    def __init__(self, items: Sequence[Item], transform: TrainTransform, cache: TeacherCache, seed: int = 0):
        if len(items) != cache.features.shape[0]:
            raise PromptKDError(f"cache holds {cache.features.shape[0]} images, the dataset has {len(items)}")
        self.items, self.transform, self.cache, self.seed, self.epoch = list(items), transform, cache, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def view_index(self, index: int) -> int:
        return augmentation_seed(self.seed, self.epoch, index) % self.cache.views

    def __getitem__(self, index: int):
        k = self.view_index(index)
        img = load_rgb(self.items[index][0])
        return self.transform.apply_view(img, self.cache.view(index, k)), self.cache.features[index, k].float(), index
