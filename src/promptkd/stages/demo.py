"""`promptkd demo`: the whole method on the embedded toy world, offline, in minutes on a CPU.

Steps: write the toy domain as a CoOp-style dataset; zero-shot baselines of both shipped CLIPs;
PromptSRC teacher tuning on 16 shots of the base classes; class vectors; distillation of the
student on the unlabelled train images of all classes; student-only evaluation; speed of both
image towers; ONNX export when available; a markdown + PNG report and metrics.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from promptkd.artifacts import atomic_open, write_json
from promptkd.engine.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes and schedules of the demo; `quick()` shrinks them for tests."""

    seed: int = 0
    n_train: int = 192  # unlabelled train images per class (distillation)
    n_val: int = 8
    n_test: int = 50
    shots: int = 16
    teacher_depth: int = 4  # vision prompt depth (the toy teacher's image tower has 4 blocks)
    teacher_text_depth: int = 3  # text prompt depth (its text tower has 3 blocks)
    teacher_ctx: int = 4
    teacher_epochs: int = 10
    teacher_lr: float = 0.01
    teacher_batch: int = 16
    student_depth: int = 3
    student_ctx: int = 8
    distill_epochs: int = 12
    distill_lr: float = 0.05
    distill_batch: int = 32
    kd_weight: float = 1000.0
    # > 0: distil from a teacher-output cache of K views per image (K teacher forwards per image
    # once, instead of one per epoch); 0: online teacher.
    teacher_cache_views: int = 8
    threads: int = 0  # torch threads (0: leave as is)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> DemoConfig:
        base = dict(n_train=6, n_val=2, n_test=4, shots=2, teacher_epochs=1, distill_epochs=1,
                    teacher_batch=8, distill_batch=8, student_ctx=2, teacher_ctx=4, teacher_cache_views=2)
        return cls(**{**base, **kw})


def _eval_zero_shot(clip, protocol, device, progress):
    """Plain CLIP: its image tower against template class vectors from its own text tower."""
    from promptkd.metrics import zero_shot_class_vectors

    W = zero_shot_class_vectors(clip, protocol.classnames, device=device)
    return _eval_encoder(clip.model.encode_image, clip.preprocess_cfg, W, protocol, device, progress)


def _eval_encoder(encode, preprocess_cfg, class_vectors, protocol, device, progress):
    """Base / novel / HM of an image encoder on the protocol's test splits (test-time transform)."""
    from promptkd.data.transforms import transforms_for
    from promptkd.metrics import evaluate_splits

    return evaluate_splits(encode, class_vectors, protocol.test, transforms_for(preprocess_cfg)[1], device=device,
                           progress=progress)


def images_per_second(encode, size: int, batch: int = 32, seconds: float = 2.0, threads: int = 1) -> float:
    """Throughput of an image encoder on random inputs, after one warm-up batch.

    One thread by default: per-image cost is what we compare, and on a small shared CPU a second
    thread mostly measures contention.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            x = torch.randn(batch, 3, size, size)
            encode(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                encode(x)
                n += batch
            return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _image_size(clip) -> int:
    size = clip.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> dict:
    """Run every stage on the toy world; returns (and writes) the metrics."""
    import torch

    from promptkd.data.protocols import build_protocol, teacher_split
    from promptkd.data.registry import build_dataset
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student, Teacher
    from promptkd.stages.class_vectors import compute_class_vectors
    from promptkd.stages.distill import distill_models
    from promptkd.stages.teacher import TeacherConfig, train_teacher_on
    from promptkd.toy.world import World

    cfg = cfg or DemoConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)

    log.info("[1/7] writing the toy domain (%d train, %d val, %d test images per class)", cfg.n_train, cfg.n_val, cfg.n_test)
    world = World(cfg.seed)
    data = world.write_domain(out / "data", n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)
    split_file = str((data / "split_zhou_Toy.json").resolve())
    image_root = str((data / "images").resolve())
    protocol = build_protocol("base2novel", f"split:{split_file}", image_root)
    ds = build_dataset(f"split:{split_file}", image_root)
    tsplit = teacher_split(ds, num_shots=cfg.shots, seed=cfg.seed + 1)

    teacher_clip, student_clip = load_clip("toy-teacher"), load_clip("toy-student")
    log.info("[2/7] zero-shot baselines")
    metrics: dict = {"classes": len(protocol.classnames), "n_base": protocol.test["base"].classes.stop}
    metrics["teacher_zeroshot"] = _eval_zero_shot(teacher_clip, protocol, device, cfg.progress)
    metrics["student_zeroshot"] = _eval_zero_shot(student_clip, protocol, device, cfg.progress)

    log.info("[3/7] teacher: PromptSRC on %d shots of %d base classes", cfg.shots, len(tsplit.classnames))
    tcfg = TeacherConfig(
        model="toy-teacher", weights="toy", shots=cfg.shots, seed=cfg.seed + 1,
        vision_depth=cfg.teacher_depth, text_depth=cfg.teacher_text_depth, n_ctx_vision=cfg.teacher_ctx,
        n_ctx_text=cfg.teacher_ctx, gpa_mean=max(1.0, cfg.teacher_epochs * 0.75), gpa_std=max(1.0, cfg.teacher_epochs / 5),
        zero_shot=False,
        train=TrainConfig(epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch, lr=cfg.teacher_lr,
                          device="cpu", progress=cfg.progress, seed=cfg.seed + 1),
    )
    teacher = Teacher(teacher_clip, cfg.teacher_depth, cfg.teacher_text_depth, cfg.teacher_ctx, cfg.teacher_ctx)
    teacher_path = train_teacher_on(teacher, tsplit.train, tsplit.val, tsplit.classnames, tcfg, out / "teacher")
    teacher.eval()

    log.info("[4/7] class vectors for all %d classes", len(protocol.classnames))
    cv = compute_class_vectors(teacher, protocol.classnames)
    cv.save(out / "class_vectors.safetensors")
    metrics["teacher"] = _eval_encoder(teacher.encode_images, teacher_clip.preprocess_cfg, cv.vectors, protocol,
                                       device, cfg.progress)

    log.info("[5/7] distillation on %d unlabelled images", len(protocol.train))
    student = Student(student_clip, teacher.dim, cfg.student_depth, cfg.student_ctx).to(device)
    dtrain = TrainConfig(epochs=cfg.distill_epochs, batch_size=cfg.distill_batch, lr=cfg.distill_lr, device="cpu",
                         progress=cfg.progress, seed=cfg.seed + 1)
    extra = {}
    if cfg.teacher_cache_views:
        extra["teacher_cache"] = _build_cache(teacher, protocol, out / "teacher_cache", cfg)
    result = distill_models(teacher, student, cv, protocol.train, out / "student", protocol=protocol, train=dtrain,
                            kd_weight=cfg.kd_weight, meta={"demo": True}, **extra)
    student.eval()
    metrics["student"] = _eval_encoder(student, student_clip.preprocess_cfg, cv.vectors, protocol, device, cfg.progress)
    metrics["distillation"] = {"unlabelled_images": len(protocol.train), "epochs": cfg.distill_epochs,
                               "teacher": f"teacher-output cache, K={cfg.teacher_cache_views} views per image"
                               if cfg.teacher_cache_views else "online teacher", "seconds": result.train.seconds}

    log.info("[6/7] speed of the two image towers")
    metrics["teacher_images_per_s"] = images_per_second(teacher.encode_images, _image_size(teacher_clip))
    metrics["student_images_per_s"] = images_per_second(student, _image_size(student_clip))
    metrics["teacher_params"] = _count(teacher_clip.model.visual)
    metrics["student_params"] = _count(student_clip.model.visual) + _count(student.projector)
    metrics["artifacts"] = {"teacher": str(teacher_path), "class_vectors": str(out / "class_vectors.safetensors"),
                            "student": str(result.student_path)}

    log.info("[7/7] export and report")
    onnx_path, diff = _try_export(result.student_path, out / "class_vectors.safetensors", out / "student.onnx",
                                  student_clip)
    if onnx_path:
        metrics["artifacts"]["onnx"] = str(onnx_path)
        metrics["onnx_max_abs_logit_diff"] = diff
    metrics["seconds"] = time.perf_counter() - t_start
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, cfg)
    return metrics


def _build_cache(teacher, protocol, cache_dir, cfg):
    """The teacher-output cache's folder (distillation opens and checks it)."""
    from promptkd.stages.cache import CacheSpec, build_teacher_cache

    shutil.rmtree(cache_dir, ignore_errors=True)  # a demo run is always fresh: the teacher was just retrained
    return build_teacher_cache(teacher, protocol.train, None, cache_dir,
                               CacheSpec(views=cfg.teacher_cache_views, seed=cfg.seed), progress=cfg.progress)


def _try_export(student_path, cv_path, onnx_path, student_clip):
    """ONNX export of the distilled classifier, with a parity check; skipped if onnx is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("ONNX export skipped: install promptkd[onnx]")
        return None, None
    from promptkd.deploy import StudentClassifier
    from promptkd.stages.export import export_onnx, parity

    clf = StudentClassifier.load(student_path, cv_path, clip=student_clip)
    path = export_onnx(clf, onnx_path)
    return path, parity(clf, path)


def _row(name, m):
    return f"| {name} | {m['base']:.1f} | {m['novel']:.1f} | {m['hm']:.1f} |"


def write_report(out: Path, metrics: dict, cfg: DemoConfig) -> None:
    """report.md (the evaluation table) and report.png (base/novel/HM bars)."""
    lines = [
        "# promptkd demo: PromptKD on the toy world",
        "",
        f"{metrics['classes']} domain classes ({metrics['n_base']} base, {metrics['classes'] - metrics['n_base']} novel); "
        f"teacher tuned on {cfg.shots} shots per base class; student distilled on {cfg.n_train} unlabelled images "
        "per class (all classes, labels unused). Accuracy in % on the test split.",
        "",
        "| model | base | novel | HM |",
        "|---|---|---|---|",
        _row("student zero-shot (toy-student CLIP)", metrics["student_zeroshot"]),
        _row("teacher zero-shot (toy-teacher CLIP)", metrics["teacher_zeroshot"]),
        _row("teacher, PromptSRC-tuned", metrics["teacher"]),
        _row("student, distilled (PromptKD)", metrics["student"]),
        "",
        "| image tower | parameters | images/s (CPU, 1 thread) |",
        "|---|---|---|",
        f"| teacher | {metrics['teacher_params']:,} | {metrics['teacher_images_per_s']:.0f} |",
        f"| student (+ projector) | {metrics['student_params']:,} | {metrics['student_images_per_s']:.0f} |",
        "",
        f"Distillation: {metrics['distillation']['epochs']} epochs over {metrics['distillation']['unlabelled_images']} "
        f"unlabelled images; teacher outputs: {metrics['distillation']['teacher']}.",
        "",
        f"Student speed-up per image: {metrics['student_images_per_s'] / metrics['teacher_images_per_s']:.1f}x. "
        f"Total time: {metrics['seconds']:.0f} s.",
        "",
        "![results](report.png)",
        "",
    ]
    with atomic_open(out / "report.md", "w") as f:
        f.write("\n".join(lines))
    _plot(out / "report.png", metrics)


def _plot(path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("student_zeroshot", "student\nzero-shot"), ("teacher_zeroshot", "teacher\nzero-shot"),
             ("teacher", "teacher\ntuned"), ("student", "student\ndistilled")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.26
    for j, key in enumerate(("base", "novel", "hm")):
        ax.bar([i + (j - 1) * width for i in range(len(names))], [metrics[k][key] for k, _ in names], width,
               label=key if key != "hm" else "HM")
    ax.set_xticks(range(len(names)), [n for _, n in names])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=3, loc="upper left")
    ax.set_title("PromptKD on the toy world")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# What a demo writes into its folder (an --overwrite removes these first).
DEMO_OUTPUTS = ("data", "teacher", "student", "teacher_cache", "class_vectors.safetensors", "student.onnx",
                "metrics.json", "report.md", "report.png")


def register(sub) -> None:
    from promptkd.options import add_output_options, non_negative_int

    p = sub.add_parser("demo", help="run the whole method on the embedded toy world (offline, minutes on a CPU)",
                       description="Teacher tuning, class vectors, distillation, evaluation, export and a report, "
                                   "on a procedurally generated world with two shipped tiny CLIPs (on the CPU).")
    add_output_options(p, "dir", required=False, what="demo", help="output folder (default: demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for smoke tests, not for numbers)")
    p.add_argument("--teacher-cache-views", type=non_negative_int, default=None, metavar="K",
                   help="views per image in the teacher-output cache (default 8; 0: online teacher)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run, out="demo-out")


def _run(args) -> int:
    from promptkd.runs import claim_folder

    if args.device not in (None, "auto", "cpu"):
        log.warning("the demo runs on the CPU (its report compares CPU speeds); --device %s is not used", args.device)
    claim = claim_folder(args.out, DEMO_OUTPUTS, overwrite=args.overwrite, what="demo", finished="report.md")
    kw = {"seed": args.seed, "threads": args.threads, "progress": not args.no_progress}
    if args.teacher_cache_views is not None:
        kw["teacher_cache_views"] = args.teacher_cache_views
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    metrics = run_demo(claim.prepare(), cfg)
    print((Path(args.out) / "report.md").read_text())
    print(json.dumps({k: metrics[k] for k in ("student_zeroshot", "teacher_zeroshot", "teacher", "student")}))
    return 0
