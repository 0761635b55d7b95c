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
`images.json` lists every image with its size and mtime when the build started: a run with another
image list is told what differs, and an image changed in place since then is found by one `stat`
per image (its bytes are not hashed: an edit that keeps both size and mtime goes unseen).

When it pays off: online distillation runs the teacher image tower epochs x N times per run; the
cache runs it K x N times once, for every later run (seeds, students, KD settings, class lists).
Disk and memory: N x K x D x 2 bytes (ImageNet, K=8, D=768: 15.7 GB). Online stays the default:
distillation uses a cache only when given one (`promptkd cache`, then `distill --teacher-cache`).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.artifacts import (
    TensorLayout,
    artifact_layout,
    check_finite,
    read_json,
    read_rows,
    save_artifact,
    write_json,
)
from promptkd.errors import PromptKDError
from promptkd.runs import items_digest

if TYPE_CHECKING:  # torch, the data and model modules are imported where they run (fast `--help`)
    import torch

    from promptkd.data.dataset import Item
    from promptkd.data.transforms import TrainTransform, View

log = logging.getLogger(__name__)
CACHE_VERSION = 1
IMAGES_FILE = "images.json"  # the image list with each file's size and mtime (see the module docstring)


def _stat(path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def write_image_list(out: Path, items: Sequence[Item]) -> None:
    """Record the image list with each file's size and mtime (kept as it is when a build resumes)."""
    if not (out / IMAGES_FILE).is_file():
        paths = [str(p) for p, _ in items]
        write_json(out / IMAGES_FILE, {"paths": paths, "stats": [_stat(p) for p in paths]})


def image_list_difference(d: Path, m: dict, items: Sequence[Item]) -> str | None:
    """How `items` differ from the image list a cache was built for, or None when they are the same
    images, unchanged since the build."""
    paths = [str(p) for p, _ in items]
    try:
        recorded = read_json(d / IMAGES_FILE)
        old, stats = recorded["paths"], recorded["stats"]
        if not (isinstance(old, list) and isinstance(stats, list) and len(old) == len(stats) == m["n_images"]):
            raise TypeError
    except (OSError, PromptKDError, KeyError, TypeError):
        old = stats = None  # a cache built before images.json: the digest alone
    if len(paths) == m["n_images"] and items_digest(items) == m["items_digest"]:
        changed = [p for p, s in zip(paths, stats or []) if _stat(p) != s]
        if not changed:
            return None
        return (f"{len(changed)} of its images changed since the cache was built (size or modification time), "
                f"e.g. {changed[0]}; rebuild it with `promptkd cache ... --overwrite`")
    if old is None:
        return (f"cache was built for another image list: {m['n_images']} images there, {len(paths)} in this run"
                + ("; the same count, but other files or another order" if len(paths) == m["n_images"] else ""))
    only_cache, only_run = sorted(set(old) - set(paths)), sorted(set(paths) - set(old))
    if not only_cache and not only_run:
        first = next(i for i, (a, b) in enumerate(zip(old, paths)) if a != b)
        return (f"cache was built for the same {len(paths)} images in another order (position {first}: "
                f"{old[first]} there, {paths[first]} in this run); use the same --protocol, --shots and --seed")
    parts = [f"{len(only_cache)} only in the cache (e.g. {only_cache[0]})" if only_cache else "",
             f"{len(only_run)} only in this run (e.g. {only_run[0]})" if only_run else ""]
    return (f"cache was built for another image list ({m['n_images']} images there, {len(paths)} in this run): "
            + ", ".join(p for p in parts if p))


def transform_spec(tf: TrainTransform) -> dict:
    """What decides the pixels the teacher saw for a recorded view (stored in the manifest)."""
    return {"size": tf.size, "scale": list(tf.scale), "ratio": list(tf.ratio), "mean": list(tf.mean),
            "std": list(tf.std), "interpolation": tf.interpolation.value, "renderer": tf.renderer}


def view_generator(seed: int, view: int, index: int) -> torch.Generator:
    """View k of image i is drawn from (seed, k, i) alone: reproducible and order-independent."""
    import torch

    from promptkd.data.dataset import augmentation_seed

    return torch.Generator().manual_seed(augmentation_seed(seed, 1_000_000 + view, index))


class _ViewRenderer:
    """Renders the K views of each image of one shard with the teacher's transform (a map-style
    dataset for DataLoader)."""

    def __init__(self, items, indices, transform: TrainTransform, views: int, seed: int):
        self.items, self.indices, self.transform, self.views, self.seed = items, indices, transform, views, seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        import torch

        from promptkd.data.dataset import ImageSource

        i = self.indices[j]
        source = ImageSource(self.items[i][0])  # decoded once per JPEG reduction the K views need
        tensors, boxes = [], []
        for k in range(self.views):
            t, v = self.transform.draw(source, view_generator(self.seed, k, i))
            tensors.append(t)
            boxes.append([v.top, v.left, v.h, v.w, int(v.flip)])
        return torch.stack(tensors), torch.tensor(boxes, dtype=torch.int32)


@dataclass
class CacheSpec:
    views: int = 8
    seed: int = 0
    shard_size: int = 1024
    batch_size: int = 64  # views per teacher forward
    num_workers: int = 0


def teacher_train_transform(teacher) -> TrainTransform:
    """The teacher's own train transform with the fast renderer: the one distillation checks a cache against."""
    from promptkd.data.transforms import transforms_for

    return transforms_for(teacher.clip.preprocess_cfg, renderer="uint8")[0]


def build_teacher_cache(teacher, items: Sequence[Item], transform: TrainTransform | None, out_dir: str | Path,
                        spec: CacheSpec | None = None, *, device: str | torch.device = "cpu",
                        precision: str = "fp32", progress: bool = True) -> Path:
    """Run the teacher image tower once over K views of every image; resumable. Returns the cache dir.

    `transform` None: the teacher's own train transform (what `distill_models` expects).
    """
    import torch

    from promptkd.engine import distributed
    from promptkd.logs import progress_bar

    spec = spec or CacheSpec()
    transform = transform or teacher_train_transform(teacher)
    if spec.views < 1 or spec.shard_size < 1:
        raise PromptKDError("cache views and shard size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)
    header = {
        "kind": "teacher_cache", "version": CACHE_VERSION, "teacher": teacher.identity(),
        "views": spec.views, "seed": spec.seed, "n_images": len(items), "items_digest": items_digest(items),
        "dim": teacher.dim, "dtype": "float16", "shard_size": spec.shard_size, "precision": precision,
        "transform": transform_spec(transform),
    }
    manifest_path = out / "manifest.json"
    shards: list[dict] = []
    if manifest_path.exists():
        old = check_manifest(read_json(manifest_path), out)
        differ = sorted(k for k in {*old, *header} - {"shards"} if old.get(k) != header.get(k))
        if differ:
            raise PromptKDError(f"{out}: holds a cache for another teacher, image list or settings ({', '.join(differ)} "
                                "differ); use a new folder")
        shards = [s for s in old.get("shards", []) if (out / s["file"]).is_file()]
    # Under torchrun each rank renders and encodes whole shards (round-robin over the missing ones),
    # so a shard is computed exactly as one process computes it; rank 0 lists them in the manifest.
    info = distributed.current()
    if info.is_main:
        write_image_list(out, items)
    n_shards = math.ceil(len(items) / spec.shard_size)
    done = torch.zeros(n_shards, dtype=torch.int64)
    for s in shards:
        done[s["start"] // spec.shard_size] = 1
    todo = [int(s) for s in (distributed.from_main(done) == 0).nonzero().flatten()]
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    bar = progress_bar(total=len(items) * spec.views, desc="teacher cache", unit="view",
                       enabled=progress and info.is_main)
    bar.update(sum(s["end"] - s["start"] for s in shards) * spec.views)
    for first in range(0, len(todo), info.world_size):
        round_ = todo[first:first + info.world_size]
        finished = torch.zeros(n_shards, dtype=torch.int64)
        if info.rank < len(round_):
            _build_shard(teacher, items, transform, spec, out, round_[info.rank], device, precision)
            finished[round_[info.rank]] = 1
        for s in distributed.sum_over_ranks(finished).nonzero().flatten().tolist():
            start, end = _shard_range(s, spec, len(items))
            shards.append({"file": _shard_name(s), "start": start, "end": end})
            bar.update((end - start) * spec.views)
        if info.is_main:
            write_json(manifest_path, {**header, "shards": sorted(shards, key=lambda d: d["start"])})
    bar.close()
    if not shards and not items and info.is_main:
        write_json(manifest_path, {**header, "shards": []})
    distributed.barrier()  # every rank returns once the manifest lists every shard
    return out


def _shard_range(s: int, spec: CacheSpec, n: int) -> tuple[int, int]:
    """Item indices [start, end) of shard s: one rule for the manifest and the shard file."""
    return s * spec.shard_size, min((s + 1) * spec.shard_size, n)


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _build_shard(teacher, items, transform, spec: CacheSpec, out: Path, s: int, device, precision: str) -> None:
    """Teacher features for the K views of every image of shard s, written atomically."""
    import torch
    from torch.utils.data import DataLoader

    from promptkd.engine.loop import autocast

    start, end = _shard_range(s, spec, len(items))
    loader = DataLoader(_ViewRenderer(items, list(range(start, end)), transform, spec.views, spec.seed),
                        batch_size=max(1, spec.batch_size // spec.views), num_workers=spec.num_workers,
                        pin_memory=device.type == "cuda")
    feats, boxes = [], []
    for images, b in loader:
        n = images.shape[0]
        x = transform.normalize(images.flatten(0, 1).to(device, non_blocking=True))
        with torch.no_grad(), autocast(device, precision):
            f = teacher.encode_images(x)
        feats.append(f.float().view(n, spec.views, -1).half().cpu())
        boxes.append(b)
    name = _shard_name(s)
    feats = torch.cat(feats)
    check_finite({"features": feats}, f"{out / name} (not written: the teacher gave NaN/inf features)")
    save_artifact(out / name, {"features": feats, "views": torch.cat(boxes)},
                  {"kind": "teacher_cache_shard", "start": start, "end": end})


def check_manifest(m, d: Path) -> dict:
    """A manifest must have the shape build_teacher_cache writes; a damaged or crafted one says what is wrong."""
    if not isinstance(m, dict) or m.get("kind") != "teacher_cache":
        raise PromptKDError(f"{d}: not a teacher cache (manifest kind {m.get('kind') if isinstance(m, dict) else None!r})")
    if not isinstance(m.get("teacher"), dict):
        raise PromptKDError(f"{d}: manifest 'teacher' must be a JSON object")
    for key in ("views", "dim", "n_images"):
        if type(m.get(key)) is not int or m[key] < (1 if key != "n_images" else 0):
            raise PromptKDError(f"{d}: manifest '{key}' must be a positive integer, got {m.get(key)!r}")
    if not isinstance(m.get("shards"), list):
        raise PromptKDError(f"{d}: manifest 'shards' must be a list")
    for s in m["shards"]:
        ok = (isinstance(s, dict) and isinstance(s.get("file"), str) and s["file"] == Path(s["file"]).name
              and not s["file"].startswith(".") and type(s.get("start")) is int and type(s.get("end")) is int
              and 0 <= s["start"] < s["end"] <= m["n_images"])
        if not ok:  # a shard file outside the folder, or indices outside the images, is refused
            raise PromptKDError(f"{d}: manifest lists a malformed shard {str(s)[:120]}")
    return m


def require_cache_folder(folder: str | Path, option: str = "") -> Path:
    """A folder that holds a teacher cache's manifest; else one line (naming `option` when given)."""
    d = Path(folder)
    if not (d / "manifest.json").is_file():
        raise PromptKDError(f"{option + ' ' if option else ''}{d}: no teacher cache here (manifest.json missing); "
                            "build one with `promptkd cache`")
    return d


class TeacherCache:
    """A built cache, read on demand: its size on disk (N x K x D x 2 bytes of fp16 features) never
    has to fit in memory.

    Opening parses the shard headers and scans every shard's features for NaN/inf in chunks of
    CHECK_CHUNK_BYTES; `feature(i, k)` and `view(i, k)` then read one stored view with os.pread.
    Reads go through the page cache, which the OS shares and reclaims, so the process's resident
    memory stays bounded whatever the cache size (a memory map would count every page it touched
    as resident). Each process (DataLoader worker) opens its own file descriptors.
    """

    CHECK_CHUNK_BYTES = 2**20  # small: freed chunks then go straight back to the OS

    def __init__(self, cache_dir: str | Path, teacher_identity: dict | None = None, items: Sequence[Item] | None = None):
        import torch

        d = require_cache_folder(cache_dir)
        m = check_manifest(read_json(d / "manifest.json"), d)
        self.dir, self.manifest = d, m
        self.check(teacher_identity, items)
        shards = sorted(m["shards"], key=lambda s: s["start"])
        ends = [0] + [s["end"] for s in shards]
        if [s["start"] for s in shards] != ends[:-1]:
            raise PromptKDError(f"{d}: manifest shards overlap or leave gaps; rebuild the cache in a new folder")
        covered = ends[-1]
        if covered != m["n_images"]:
            raise PromptKDError(f"{d}: cache is incomplete ({covered}/{m['n_images']} images); continue the build with `promptkd cache ... --resume`")
        self.views, self.dim, self.n_images = int(m["views"]), int(m["dim"]), int(m["n_images"])
        self._starts = [s["start"] for s in shards]
        self._shards: list[tuple[Path, TensorLayout, TensorLayout]] = []
        for s in shards:
            path = d / s["file"]
            layout, _ = artifact_layout(path, kind="teacher_cache_shard")
            n = s["end"] - s["start"]
            f, v = layout.get("features"), layout.get("views")
            if (f is None or v is None or f.shape != (n, self.views, self.dim) or v.shape != (n, self.views, 5)
                    or f.dtype != torch.float16 or v.dtype != torch.int32):
                raise PromptKDError(f"{path}: shard tensors do not have the manifest's shape "
                                    f"({n} images x {self.views} views x {self.dim}, fp16 features, int32 views)")
            self._shards.append((path, f, v))
        self._fds: dict[Path, int] = {}
        self._pid = os.getpid()
        self._check_finite()

    def __getstate__(self):  # loader workers open their own descriptors
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # a forked worker: its parent's descriptors are not its own to share
            self._fds, self._pid = {}, os.getpid()
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fds[path]

    def _check_finite(self) -> None:
        """Refuse NaN/inf features, naming the shard, without holding more than a chunk in memory."""
        for path, f, _ in self._shards:
            step = max(1, self.CHECK_CHUNK_BYTES // max(f.row_bytes, 1))
            for start in range(0, f.shape[0], step):
                check_finite({"features": read_rows(self._fd(path), f, start, min(start + step, f.shape[0]))},
                             str(path))

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.n_images:
            raise IndexError(f"image {index} is outside the cache's {self.n_images}")
        s = bisect.bisect_right(self._starts, index) - 1
        return s, index - self._starts[s]

    def _read(self, index: int, k: int, which: int) -> torch.Tensor:
        s, row = self._locate(index)
        path, layout = self._shards[s][0], self._shards[s][which]
        # the tensor seen as (N * K, ...) rows: one stored view is one row
        per_view = replace(layout, shape=(self.views * layout.shape[0], *layout.shape[2:]))
        return read_rows(self._fd(path), per_view, row * self.views + k, row * self.views + k + 1)[0]

    def feature(self, index: int, k: int) -> torch.Tensor:
        """The teacher's stored fp16 feature (D,) for view k of image `index`."""
        return self._read(index, k, 1)

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, K, D) fp16, views (N, K, 5) int32), all in memory: for small caches and tests."""
        import torch

        if not self._shards:
            return (torch.empty(0, self.views, self.dim, dtype=torch.float16),
                    torch.empty(0, self.views, 5, dtype=torch.int32))
        feats = [read_rows(self._fd(p), f, 0, f.shape[0]) for p, f, _ in self._shards]
        views = [read_rows(self._fd(p), v, 0, v.shape[0]) for p, _, v in self._shards]
        return torch.cat(feats), torch.cat(views)

    def check(self, teacher_identity: dict | None = None, items: Sequence[Item] | None = None,
              transform: TrainTransform | None = None) -> None:
        """Refuse a cache of another teacher, image list or teacher transform, saying what differs."""
        from promptkd.models.wrappers import check_same_teacher

        d, m = self.dir, self.manifest
        if teacher_identity is not None:
            check_same_teacher(m["teacher"], teacher_identity, f"{d}: cache was built by another teacher", "cache")
        differs = image_list_difference(d, m, items) if items is not None else None
        if differs:
            raise PromptKDError(f"{d}: {differs}")
        if transform is not None:
            want, got = transform_spec(transform), m.get("transform") or {}
            diff = [k for k in want if got.get(k) != want[k]]
            if diff:
                raise PromptKDError(f"{d}: cache views were rendered with another transform ({', '.join(diff)} "
                                    "differ from the teacher's train transform)")

    def identity(self) -> dict:
        """What a run records about its cache (a resume with another cache is refused)."""
        return {k: self.manifest[k] for k in ("views", "seed", "items_digest")}

    def view(self, index: int, k: int) -> View:
        from promptkd.data.transforms import View

        t, left, h, w, flip = (int(x) for x in self._read(index, k, 2))
        return View(t, left, h, w, bool(flip))


class CachedViewDataset:
    """Distillation inputs from a cache: (student view tensor, teacher feature, index).

    Image i replays view (offset_i + epoch) mod K, offset_i drawn from (seed, i): every K epochs use
    each stored view once (independent draws with K = epochs would leave ~1/e of them unused).
    """

    def __init__(self, items: Sequence[Item], transform: TrainTransform, cache: TeacherCache, seed: int = 0):
        import torch

        if len(items) != cache.n_images:
            raise PromptKDError(f"cache holds {cache.n_images} images, the dataset has {len(items)}")
        self.items, self.transform, self.cache, self.seed, self.epoch = list(items), transform, cache, seed, 0
        self.on_bad_image = "substitute"
        self.unreadable = torch.zeros(len(self.items), dtype=torch.bool).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_on_bad_image(self, policy: str) -> None:
        self.on_bad_image = policy

    def unreadable_count(self) -> int:
        return int(self.unreadable.sum())

    def __len__(self):
        return len(self.items)

    def view_index(self, index: int) -> int:
        from promptkd.data.dataset import augmentation_seed

        return (augmentation_seed(self.seed, -1, index) + self.epoch) % self.cache.views

    def _render(self, index: int) -> torch.Tensor:
        from promptkd.data.dataset import ImageSource

        return self.transform.render(ImageSource(self.items[index][0]), self.cache.view(index, self.view_index(index)))

    def __getitem__(self, index: int):
        from promptkd.data.dataset import read_item

        # An image unreadable since the cache was built: the next readable one, with its own features.
        x, _, index = read_item(self.items, index, self.on_bad_image, self.unreadable, load=self._render)
        return x, self.cache.feature(index, self.view_index(index)).float(), index


# ----------------------------------------------------------------------------------------------
# `promptkd cache`


CACHE_OUTPUTS = ("manifest.json", IMAGES_FILE, "shard-*.safetensors", "run.json")  # what `promptkd cache` writes


def cache_complete(folder: Path) -> bool:
    """Whether a cache folder's manifest covers all its images (a finished build)."""
    try:
        m = check_manifest(read_json(folder / "manifest.json"), folder)
    except PromptKDError:
        return False
    return sum(s["end"] - s["start"] for s in m["shards"]) == m["n_images"]


def _run(args) -> int:
    from promptkd.data.protocols import build_protocol
    from promptkd.engine import distributed
    from promptkd.engine.loop import resolve_device, resolve_precision
    from promptkd.inputs import dataset_inputs
    from promptkd.runs import (
        check_apart,
        claim_folder,
        dataset_record,
        finish_run_record,
        promptkd_files,
        write_run_record,
    )
    from promptkd.stages.teacher_choice import (
        TeacherChoice,
        check_teacher_choice,
        load_teacher_choice,
        teacher_inputs,
    )

    choice = TeacherChoice(args.teacher, args.teacher_model, args.teacher_weights)  # or a plain CLIP
    choice = check_teacher_choice(choice, "cache")  # its teacher file resolved once
    data, roots = dataset_inputs(args.dataset, args.root)
    check_apart(args.out, {**teacher_inputs(choice), **data}, roots=roots)
    device, info = distributed.join_ranks(resolve_device(args.device))  # torchrun: each rank builds its shards
    claim = claim_folder(args.out, CACHE_OUTPUTS, overwrite=args.overwrite, resume=args.resume, what="teacher cache",
                         finished=cache_complete, marker="manifest.json", command="cache")
    # The same image list `promptkd distill` trains on (same protocol, shots and seed).
    protocol = build_protocol(args.protocol, args.dataset, args.root, num_shots=args.shots, seed=args.seed)
    items = protocol.train
    teacher, record = load_teacher_choice(choice, device=device, seed=args.seed)
    out = claim.prepare()
    distributed.barrier()  # rank 0 has removed what --overwrite replaces
    if info.is_main:
        write_run_record(out, "cache", {
            **record,
            "dataset": dataset_record(protocol.dataset, args.root, items, protocol=args.protocol, shots=args.shots,
                                      seed=args.seed)})
    spec = CacheSpec(views=args.views, seed=args.view_seed, shard_size=args.shard_size, batch_size=args.batch_size,
                     num_workers=args.num_workers)
    build_teacher_cache(teacher, items, None, out, spec, device=device,
                        precision=resolve_precision(args.precision, device), progress=not args.no_progress)
    if not info.is_main:
        return 0
    finish_run_record(out, [p.name for p in promptkd_files(out, CACHE_OUTPUTS)])
    gb = len(items) * args.views * teacher.dim * 2 / 1e9
    print(f"teacher cache: {out} ({len(items)} images x {args.views} views, {gb:.2f} GB)")
    return 0


def register(sub) -> None:
    from promptkd.data.protocols import PROTOCOLS
    from promptkd.inputs import add_clip_args
    from promptkd.options import (
        PRECISIONS,
        add_old_spellings,
        add_output_options,
        non_negative_int,
        positive_int,
    )

    p = sub.add_parser(
        "cache", help="store the teacher's image features for K augmented views of each training image",
        description="Runs the teacher image tower once over K replayable views per image, so that "
                    "`promptkd distill --teacher-cache DIR` never runs it. Pays off when K is below the number "
                    "of distillation epochs, or when the cache is reused across runs. An interrupted build "
                    "continues with --resume.")
    p.add_argument("--teacher", metavar="PATH|DIR", help="teacher file or run folder (or a plain CLIP: "
                                                          "--teacher-model M --teacher-weights W alone)")
    add_clip_args(p, "teacher")
    p.add_argument("--dataset", required=True, metavar="NAME", help="benchmark name or folder:PATH / split:FILE.json")
    p.add_argument("--root", help="data root holding the CoOp dataset folders")
    p.add_argument("--protocol", default="base2novel", choices=PROTOCOLS)
    p.add_argument("--shots", type=non_negative_int, default=0, metavar="K",
                   help="as given to distill: unlabelled images per class (0: all images)")
    p.add_argument("--seed", type=int, default=1, help="distill's seed; matters only with --shots")
    p.add_argument("--views", type=positive_int, default=8, metavar="K", help="augmented views per image (default 8)")
    p.add_argument("--view-seed", type=int, default=0)
    add_output_options(p, "dir", resume=True, what="teacher cache", help="cache folder (manifest.json, shards)")
    p.add_argument("--shard-size", type=positive_int, default=1024, metavar="IMAGES")
    p.add_argument("--batch-size", type=positive_int, default=64, help="views per teacher forward")
    p.add_argument("--num-workers", type=non_negative_int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    add_old_spellings(p, "cache")
    p.set_defaults(func=_run, resume_marker="manifest.json")
