"""Images/s per core of the training input path: the project's against the official one.

Pipelines, each over the same generated ImageNet-like JPEGs (benchmarks/photos.py: 500x375,
about 100 KB), one image at a time in one thread, as one DataLoader worker runs them:
- official:      PIL open + convert("RGB"), torchvision RandomResizedCrop(224, bicubic),
                 RandomHorizontalFlip, ToTensor, Normalize (Dassl's train transform)
- project-pil:   the project's PIL renderer (TrainTransform via ImageDataset): the official
                 pixels from replayable views
- project:       the project's train path (Uint8TrainTransform via ImageDataset, what `promptkd
                 distill` and `promptkd cache` use): uint8 crop + antialiased resize, uint8 out;
                 the conversion and normalisation run later on the device, per batch
- decode-pil:    PIL's decode alone (libjpeg-turbo): what any full-decode path pays per image
- decode-tvio:   torchvision.io.decode_jpeg alone, for comparison

With --region-probe, three more rows measure how far a decoder that skips work could go
(benchmarks/jpeg_region.c, built here with the C compiler against libjpeg-turbo's headers):
- probe-region:  libjpeg-turbo's partial decode of only the view's region (rows above it
                 entropy-decoded only, columns beside it not transformed, nothing below it read)
- probe-entropy: the same probe asked for the last row's first pixel: the Huffman decoding of the
                 whole image, which no decoder of a sequential JPEG can skip
- project-region: the project path with probe-region as its decoder (same views, same pixels)

Passes are interleaved (every pipeline once per repetition) and the ratio to the official
pipeline is taken within each repetition, then the median. Rates are images per CPU second of
this (single-threaded) process, the per-core cost, which a shared machine barely changes; wall
rates are printed beside them. Also prints how far the uint8 renderer's pixels are from PIL's
on the same views.
Usage:  python benchmarks/loader.py --images 200 --reps 7 [--core 1] [--region-probe] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch
from photos import write_photo_folder  # benchmarks/ is the script's folder: first on sys.path


def build_region_probe(folder: Path):
    """Compile and import benchmarks/jpeg_region.c; one line and exit 2 where it cannot be built."""
    out = folder / f"jpeg_region{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
           str(Path(__file__).with_name("jpeg_region.c")), "-ljpeg", "-o", str(out)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        print(f"--region-probe needs a C compiler and libjpeg-turbo's headers (a libjpeg-turbo -dev "
              f"package): {why[-1] if why else e}", file=sys.stderr)
        sys.exit(2)
    spec = importlib.util.spec_from_file_location("jpeg_region", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def region_pipelines(paths: list[str], size: int, probe) -> dict:
    """The probe's rows: region decode, entropy decode only, and the project path with the region decode."""
    from promptkd.data.dataset import _plain_jpeg
    from promptkd.data.transforms import Uint8TrainTransform, View, sample_view

    fast = Uint8TrainTransform(size)
    gens = {k: torch.Generator().manual_seed(0) for k in ("region", "project")}

    def region(i, key="region"):
        data, w, h = _plain_jpeg(paths[i])
        v = sample_view(w, h, gens[key], fast.scale, fast.ratio)
        return torch.frombuffer(probe.decode(data, v.top, v.left, v.h, v.w), dtype=torch.uint8).view(v.h, v.w, 3), v

    def entropy(i):
        data, w, h = _plain_jpeg(paths[i])
        probe.decode(data, h - 1, 0, 1, 1)

    def project(i):
        hwc, v = region(i, "project")
        return fast._resized_crop(hwc, View(0, 0, v.h, v.w, v.flip))

    return {"probe-region": region, "probe-entropy": entropy, "project-region": project}


def region_exact(paths: list[str], probe, n_views: int = 8) -> dict:
    """The probe's region pixels against a full decode (torchvision.io) cropped to the same views."""
    import torchvision.io as tio

    from promptkd.data.dataset import _plain_jpeg
    from promptkd.data.transforms import sample_view

    equal = total = 0
    for i, p in enumerate(paths):
        data, w, h = _plain_jpeg(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = tio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   mode=tio.ImageReadMode.RGB).permute(1, 2, 0)
        g = torch.Generator().manual_seed(i)
        for _ in range(n_views):
            v = sample_view(w, h, g)  # the official scale and ratio, as the project's train path draws
            got = torch.frombuffer(probe.decode(data, v.top, v.left, v.h, v.w), dtype=torch.uint8).view(v.h, v.w, 3)
            equal += torch.equal(got, full[v.top:v.top + v.h, v.left:v.left + v.w])
            total += 1
    return {"views": total, "equal": equal}


def pipelines(paths: list[str], size: int) -> dict:
    import torchvision.io as tio
    import torchvision.transforms as T
    from PIL import Image

    from promptkd.data.dataset import ImageDataset, Item
    from promptkd.data.transforms import CLIP_MEAN, CLIP_STD, TrainTransform, Uint8TrainTransform

    official = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    items = [Item(p, 0) for p in paths]
    pil_ds = ImageDataset(items, TrainTransform(size), seed=0)
    fast_ds = ImageDataset(items, Uint8TrainTransform(size), seed=0)

    def decode_pil(i):
        with Image.open(paths[i]) as im:
            im.load()

    def decode_tvio(i):
        with warnings.catch_warnings():  # deprecated in torchvision 0.29, still libjpeg-turbo
            warnings.simplefilter("ignore")
            tio.decode_jpeg(tio.read_file(paths[i]), mode=tio.ImageReadMode.RGB)

    return {
        "official": lambda i: official(Image.open(paths[i]).convert("RGB")),
        "project-pil": lambda i: pil_ds[i],
        "project": lambda i: fast_ds[i],
        "decode-pil": decode_pil,
        "decode-tvio": decode_tvio,
    }


def pixel_difference(paths: list[str], size: int, n_views: int = 4) -> dict:
    """uint8 renderer vs PIL renderer on the same views: |difference| in 8-bit levels and normalised units."""
    from promptkd.data.dataset import ImageSource
    from promptkd.data.transforms import TrainTransform, Uint8TrainTransform

    pil, fast = TrainTransform(size), Uint8TrainTransform(size)
    levels, normed = [], []
    for i, p in enumerate(paths):
        for k in range(n_views):
            g1, g2 = (torch.Generator().manual_seed(1000 * i + k) for _ in range(2))
            a, view_a = pil.draw(ImageSource(p), g1)
            b, view_b = fast.draw(ImageSource(p), g2)
            assert view_a == view_b
            x = fast.normalize(b[None])[0]
            normed.append((x - a).abs().flatten())
            std = torch.tensor(pil.std).view(3, 1, 1)
            levels.append(((x - a) * std * 255).round().abs().flatten())
    lv, nm = torch.cat(levels), torch.cat(normed)
    return {"views": len(paths) * n_views, "mean_levels": lv.mean().item(), "max_levels": lv.max().item(),
            "share_exact": (lv == 0).float().mean().item(), "share_within_1": (lv <= 1).float().mean().item(),
            "mean_normalised": nm.mean().item(), "max_normalised": nm.max().item()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="promptkd-loader-"))
    paths = [str(p) for p in write_photo_folder(folder, args.images, classes=1)][: args.images]
    kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3
    fns = pipelines(paths, args.size)
    probe = build_region_probe(folder) if args.region_probe else None
    if probe is not None:
        fns.update(region_pipelines(paths, args.size, probe))
    for f in fns.values():  # warm-up: imports, allocator, file cache
        for i in range(min(8, len(paths))):
            f(i)
    rates: dict[str, list[float]] = {k: [] for k in fns}  # images per CPU second
    wall: dict[str, list[float]] = {k: [] for k in fns}
    torch.manual_seed(0)
    for _ in range(args.reps):
        for name, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(len(paths)):
                f(i)
            rates[name].append(len(paths) / (time.process_time() - c0))
            wall[name].append(len(paths) / (time.perf_counter() - t0))

    def ratios(r):
        return {k: statistics.median(a / b for a, b in zip(v, r["official"])) for k, v in r.items()}

    return {"images": len(paths), "mean_kb": kb, "size": args.size, "reps": args.reps, "core": args.core,
            "threads": args.threads,
            "images_per_s": {k: statistics.median(v) for k, v in rates.items()}, "ratio_vs_official": ratios(rates),
            "wall_images_per_s": {k: statistics.median(v) for k, v in wall.items()}, "wall_ratio": ratios(wall),
            "all_rates": rates, "pixels": pixel_difference(paths[: args.diff_images], args.size),
            "region_exact": region_exact(paths[: args.diff_images], probe) if probe else None,
            "torch": torch.__version__, "cpu": _cpu_name(), "load": os.getloadavg()[0]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def table(r: dict) -> str:
    pinned = "" if r["core"] is None else f" pinned to core {r['core']}"
    lines = [f"{r['images']} JPEGs 500x375 (mean {r['mean_kb']:.0f} KB) -> {r['size']} px, {r['threads']} thread(s)"
             f"{pinned}, {r['reps']} interleaved passes, {r['cpu']}, torch {r['torch']}, "
             f"load average {r['load']:.1f}", "",
             "| pipeline | images per CPU second | x official | wall images/s | x official, wall |",
             "|---|---|---|---|---|"]
    for k, v in r["images_per_s"].items():
        lines.append(f"| {k} | {v:.0f} | {r['ratio_vs_official'][k]:.2f}x | {r['wall_images_per_s'][k]:.0f} | "
                     f"{r['wall_ratio'][k]:.2f}x |")
    px = r["pixels"]
    lines += ["", f"uint8 renderer vs PIL renderer, {px['views']} views: mean |diff| {px['mean_levels']:.3f} levels "
                  f"(max {px['max_levels']:.0f}); {100 * px['share_exact']:.1f}% of values equal, "
                  f"{100 * px['share_within_1']:.2f}% within 1 level; normalised units: mean "
                  f"{px['mean_normalised']:.2e}, max {px['max_normalised']:.3f}",
              f"project / official: {r['ratio_vs_official']['project']:.2f}x per core (CPU time) "
              f"(full-decode ceiling here: decode-pil is {r['ratio_vs_official']['decode-pil']:.2f}x)"]
    if r.get("region_exact"):
        ex, rt = r["region_exact"], r["ratio_vs_official"]
        lines += [f"probe: region pixels equal to a full decode's on {ex['equal']} of {ex['views']} views; "
                  f"project-region / official: {rt['project-region']:.2f}x; the Huffman decoding alone "
                  f"(probe-entropy) caps any libjpeg path at {rt['probe-entropy']:.2f}x"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--core", type=int, help="pin this process to one CPU core")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as in a DataLoader worker)")
    p.add_argument("--dir", help="folder for the generated JPEGs (default: a new temporary folder)")
    p.add_argument("--diff-images", type=int, default=20, help="images whose views are compared pixel by pixel")
    p.add_argument("--region-probe", action="store_true",
                   help="also measure a region-only JPEG decoder (builds benchmarks/jpeg_region.c)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    r = run(args)
    print(table(r))
    if args.json:
        from promptkd.artifacts import write_json

        write_json(args.json, r)  # atomic: a crash never leaves half a results file
    return 0


if __name__ == "__main__":
    sys.exit(main())
