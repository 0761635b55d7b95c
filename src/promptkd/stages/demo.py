"""`promptkd demo`: the whole method on the embedded toy world, offline, in minutes on a CPU.

Each step is the stage a user runs on their own data: write the toy domain as a CoOp-style dataset
(`promptkd toy domain`); zero-shot of the teacher's CLIP (`promptkd eval --clip`); PromptSRC
teacher tuning on few shots of the base classes (`promptkd teacher`); class vectors
(`promptkd class-vectors`); a teacher-output cache (`promptkd cache`); distillation of the
student on the unlabelled train images of all classes, with its baseline (`promptkd distill`);
then speed of both image towers, ONNX export when available, a markdown + PNG report and
metrics.json. The settings are a YAML preset (configs/demo/toy.yaml); the demo writes the stage
settings to OUT/configs/ and the stage commands that give the same numbers to OUT/stages.sh.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from promptkd.artifacts import atomic_open, write_json
from promptkd.errors import PromptKDError, raise_if_interrupted
from promptkd.inputs import ARTIFACT_FILES, CLASS_VECTORS_FILE
from promptkd.settings import apply_sets, check_field_types, check_known_keys, read_yaml

log = logging.getLogger(__name__)

PRESET = Path(__file__).resolve().parents[1] / "configs" / "demo" / "toy.yaml"
# `--quick`: tiny sizes for smoke tests (seconds), not for numbers.
QUICK = ["n_train=6", "n_val=2", "n_test=4", "teacher.shots=2", "teacher.gpa_mean=1", "teacher.gpa_std=1",
         "teacher.train.epochs=1", "teacher.train.batch_size=8", "distill.train.epochs=1",
         "distill.train.batch_size=8", "distill.n_ctx_vision=2", "cache_views=2", "no_labels.train.epochs=1"]
# Where each stage writes, inside the demo folder.
DATA, TEACHER_DIR, CLASS_VECTORS, CACHE_DIR, STUDENT_DIR = "data", "teacher", CLASS_VECTORS_FILE, "teacher_cache", "student"
SPLIT_FILE = "split_zhou_Toy.json"
TEACHER_ZERO_SHOT = "teacher_zero_shot.json"
# The label-free rows: the teacher's plain CLIP as teacher, alone and beside the tuned teacher.
ZS_CLASS_VECTORS, ZS_CACHE_DIR = "class_vectors_zero_shot.safetensors", "teacher_cache_zero_shot"
NO_LABELS_DIR, BOTH_DIR = "student_no_labels", "student_two_teachers"
# What a demo writes into its folder (an --overwrite removes these first).
DEMO_OUTPUTS = (DATA, TEACHER_DIR, STUDENT_DIR, CACHE_DIR, CLASS_VECTORS, "configs", "stages.sh", TEACHER_ZERO_SHOT,
                "student.onnx", "metrics.json", "report.md", "report.png", ZS_CLASS_VECTORS, ZS_CACHE_DIR,
                NO_LABELS_DIR, BOTH_DIR)


@dataclass
class DemoConfig:
    """The demo's settings, as the preset configs/demo/toy.yaml holds them (`DemoConfig.load`)."""

    seed: int  # the world's images and splits; teacher and student train with seed + 1
    n_train: int  # unlabelled train images per class (distillation)
    n_val: int
    n_test: int
    teacher: dict  # `promptkd teacher` settings; the demo adds the dataset and the seed
    cache_views: int  # > 0: distil from a teacher-output cache of K views per image; 0: online teacher
    distill: dict  # `promptkd distill` settings; the demo adds the dataset, the files and the seed
    no_labels: dict | None = None  # distill settings changed for the label-free student; None: no such row
    both_teachers: dict | None = None  # ... for a student of both teachers together; None: no such row
    threads: int = 0  # torch threads (0: leave as is)
    progress: bool = True

    def __post_init__(self):
        check_field_types(self, "demo settings")
        for name in ("teacher", "distill", "no_labels", "both_teachers"):
            if getattr(self, name) is None and name in ("no_labels", "both_teachers"):
                continue
            if not isinstance(getattr(self, name), dict):
                raise PromptKDError(f"demo settings: {name} must be a section of settings")
        if min(self.n_train, self.n_val, self.n_test, self.cache_views) < 0:
            raise PromptKDError("demo settings: n_train, n_val, n_test and cache_views must be >= 0")

    @classmethod
    def load(cls, path: str | Path | None = None, sets: list[str] | None = None) -> DemoConfig:
        """A preset (default: the packaged configs/demo/toy.yaml) with `KEY=VALUE` changes applied."""
        source = str(path or PRESET)
        data = apply_sets(read_yaml(path or PRESET), sets)
        check_known_keys(cls, data, source)
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise PromptKDError(f"{source}: missing demo setting(s) {missing}")
        return cls(**data)

    @classmethod
    def quick(cls, sets: list[str] | None = None) -> DemoConfig:
        return cls.load(None, QUICK + list(sets or []))


def stage_settings(cfg: DemoConfig, folder: str | Path) -> tuple[dict, dict]:
    """The `promptkd teacher` and `promptkd distill` settings of the demo, with its files under
    `folder` (the demo folder, or "." for the copies a user runs from inside it)."""
    folder = Path(folder)
    data = {"dataset": f"split:../{SPLIT_FILE}", "root": str(folder / DATA / "images")}  # images/../split file
    teacher = {**cfg.teacher, **data, "seed": cfg.seed + 1}
    distill = {**cfg.distill, **data, "protocol": "base2novel", "teacher": str(folder / TEACHER_DIR / ARTIFACT_FILES["teacher"]),
               "class_vectors": str(folder / CLASS_VECTORS),
               "teacher_cache": str(folder / CACHE_DIR) if cfg.cache_views else None,
               "train": {**(cfg.distill.get("train") or {}), "seed": cfg.seed + 1}}
    return teacher, distill


def label_free_settings(cfg: DemoConfig, folder: str | Path) -> dict:
    """`promptkd distill` settings of the extra rows: {"no_labels": ..., "two_teachers": ...} as configured."""
    folder = Path(folder)
    _, distill = stage_settings(cfg, folder)
    zero_shot = {"teacher_model": cfg.teacher.get("model", "toy-teacher"),
                 "teacher_weights": cfg.teacher.get("weights", "toy"), "class_vectors": str(folder / ZS_CLASS_VECTORS),
                 "teacher_cache": str(folder / ZS_CACHE_DIR) if cfg.cache_views else None}
    def changed(base: dict, changes: dict) -> dict:  # the `train:` section key by key, as in a preset
        return {**base, **changes, "train": {**base["train"], **(changes.get("train") or {})}}

    out = {}
    if cfg.no_labels is not None:
        out["no_labels"] = changed({**distill, "teacher": "", **zero_shot}, cfg.no_labels)
    if cfg.both_teachers is not None:
        out["two_teachers"] = changed({**distill, "teachers": [{k: v for k, v in zero_shot.items() if v is not None}]},
                                      cfg.both_teachers)
    return out


def stage_commands(cfg: DemoConfig) -> list[str]:
    """The CLI commands that redo the demo stage by stage, run from inside the demo folder (they
    replace its results: --overwrite)."""
    data = f"--dataset split:../{SPLIT_FILE} --root {DATA}/images"
    teacher = f"{TEACHER_DIR}/{ARTIFACT_FILES['teacher']}"
    clip = (cfg.teacher.get("model", "toy-teacher"), cfg.teacher.get("weights", "toy"))
    commands = [
        f"promptkd toy domain --out {DATA} --n-train {cfg.n_train} --n-val {cfg.n_val} --n-test {cfg.n_test} "
        f"--seed {cfg.seed} --overwrite",
        f"promptkd eval --clip-model {clip[0]} --clip-weights {clip[1]} {data} --protocol base2novel --device cpu "
        f"--out {TEACHER_ZERO_SHOT}",
        f"promptkd teacher --config configs/teacher.yaml --out {TEACHER_DIR} --overwrite",
        f"promptkd class-vectors --teacher {teacher} {data} --device cpu --out {CLASS_VECTORS} --overwrite",
    ]
    if cfg.cache_views:
        commands.append(f"promptkd cache --teacher {teacher} {data} --views {cfg.cache_views} --view-seed {cfg.seed} "
                        f"--device cpu --out {CACHE_DIR} --overwrite")
    commands.append(f"promptkd distill --config configs/distill.yaml --out {STUDENT_DIR} --overwrite")
    if cfg.no_labels is not None or cfg.both_teachers is not None:  # the teacher's plain CLIP as a teacher
        plain = f"--teacher-model {clip[0]} --teacher-weights {clip[1]}"
        commands.append(f"promptkd class-vectors {plain} {data} --device cpu --out {ZS_CLASS_VECTORS} --overwrite")
        if cfg.cache_views:
            commands.append(f"promptkd cache {plain} {data} --views {cfg.cache_views} --view-seed {cfg.seed} "
                            f"--device cpu --out {ZS_CACHE_DIR} --overwrite")
    extra = label_free_settings(cfg, ".")
    for name, folder in (("no_labels", NO_LABELS_DIR), ("two_teachers", BOTH_DIR)):
        if name in extra:
            commands.append(f"promptkd distill --config configs/distill_{name}.yaml --out {folder} --overwrite")
    return commands


def _write_stage_files(cfg: DemoConfig, out: Path) -> None:
    import yaml

    teacher, distill = stage_settings(cfg, ".")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    extra = {f"distill_{k}": v for k, v in label_free_settings(cfg, ".").items()}
    for name, settings in (("teacher", teacher), ("distill", distill), *extra.items()):
        with atomic_open(out / "configs" / f"{name}.yaml", "w") as f:
            f.write(f"# `promptkd {name.partition('_')[0]}` settings of the demo; paths are relative to the demo "
                    "folder.\n")
            f.write(yaml.safe_dump(settings, sort_keys=False))
    with atomic_open(out / "stages.sh", "w") as f:
        f.write("# The demo stage by stage, with the same numbers: run it from this folder (sh stages.sh).\n"
                "set -e\n" + "\n".join(stage_commands(cfg)) + "\n")


def images_per_second(encoders: dict, batch: int = 32, rounds: int = 8, seconds: float = 0.5,
                      threads: int = 1) -> dict:
    """Images per CPU-second of image encoders ({name: (encode, image size)}) on random inputs: the
    best of `rounds` short timings each, taken in turns after one warm-up batch.

    One thread, timed by this thread's CPU time: per-image cost is what we compare, and on a
    shared CPU wall time mostly measures the other processes (with one thread, CPU time is wall
    time on an idle machine). Taking turns and the best round keeps a busy spell of the machine
    from landing on one model only.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            inputs = {name: torch.randn(batch, 3, size, size) for name, (_, size) in encoders.items()}
            best = dict.fromkeys(encoders, 0.0)
            for name, (encode, _) in encoders.items():
                encode(inputs[name])
            for _ in range(rounds):
                for name, (encode, _) in encoders.items():
                    n, t0 = 0, time.thread_time()
                    while time.thread_time() - t0 < seconds:
                        encode(inputs[name])
                        n += batch
                    best[name] = max(best[name], n / (time.thread_time() - t0))
            return best
    finally:
        torch.set_num_threads(before)


def _image_size(clip) -> int:
    size = clip.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _scores(d: dict) -> dict:
    return {k: d[k] for k in ("base", "novel", "hm")}


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> dict:
    """Run every stage on the toy world; returns (and writes) the metrics."""
    import torch

    from promptkd.data.protocols import build_protocol
    from promptkd.inputs import load_student, load_teacher
    from promptkd.metrics import zero_shot_scores
    from promptkd.models import load_clip
    from promptkd.stages.class_vectors import write_class_vectors
    from promptkd.stages.distill import baseline_table, below_baseline, check_distill, run_distill
    from promptkd.stages.teacher import train_teacher
    from promptkd.toy.world import World

    cfg = cfg or DemoConfig.load()
    out = Path(out_dir)
    tcfg, dcfg, extra_cfgs = _stage_configs(cfg, out)  # every stage's settings are checked before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    _write_stage_files(cfg, out)
    t_start = time.perf_counter()

    log.info("[1/7] writing the toy domain (%d train, %d val, %d test images per class)", cfg.n_train, cfg.n_val, cfg.n_test)
    World(cfg.seed).write_domain(out / DATA, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)
    protocol = build_protocol("base2novel", tcfg.dataset, tcfg.root)
    metrics: dict = {"classes": len(protocol.classnames), "n_base": protocol.test["base"].classes.stop}

    log.info("[2/7] zero-shot of the teacher's CLIP")
    metrics["teacher_zeroshot"] = zero_shot_scores(load_clip(tcfg.model, tcfg.weights), protocol.classnames,
                                                   protocol.test, progress=cfg.progress)

    log.info("[3/7] teacher: PromptSRC on %d shots of %d base classes", tcfg.shots, metrics["n_base"])
    teacher_path = train_teacher(tcfg, out / TEACHER_DIR)

    log.info("[4/7] class vectors for all %d classes%s", len(protocol.classnames),
             f", teacher cache of {cfg.cache_views} views per image" if cfg.cache_views else "")
    teacher = load_teacher(teacher_path)
    write_class_vectors(teacher, protocol.classnames, out / CLASS_VECTORS)
    if cfg.cache_views:
        _build_cache(teacher, protocol, out / CACHE_DIR, cfg)

    log.info("[5/7] distillation on %d unlabelled images (with its baseline)", len(protocol.train))
    distilled = run_distill(check_distill(dcfg), out / STUDENT_DIR)
    student_path, run = distilled.student_path, distilled.metrics
    log.info("%s", baseline_table(run))
    metrics["student_zeroshot"] = _scores(run["baseline"]["student_zero_shot"])
    metrics["teacher"] = _scores(run["baseline"]["teacher"])
    metrics["student"] = _scores(run["results"]["last"])
    metrics["below_baseline"] = below_baseline(run)
    metrics["distillation"] = {"unlabelled_images": len(protocol.train), "epochs": dcfg.train.epochs,
                               "kd_weight": run["kd_weight"], "kd_reduction": run["kd_reduction"],
                               "teacher": f"teacher-output cache, K={cfg.cache_views} views per image"
                               if cfg.cache_views else "online teacher", "seconds": run["train"]["seconds"]}
    if extra_cfgs:
        metrics.update(_label_free_students(cfg, out, protocol, extra_cfgs))

    log.info("[6/7] speed of the two image towers")
    student = load_student(student_path).eval()
    speed = images_per_second({"teacher": (teacher.encode_images, _image_size(teacher.clip)),
                               "student": (student, _image_size(student.clip))})
    metrics["teacher_images_per_s"], metrics["student_images_per_s"] = speed["teacher"], speed["student"]
    metrics["teacher_params"] = _count(teacher.clip.model.visual)
    metrics["student_params"] = _count(student.clip.model.visual) + _count(student.projector)
    metrics["artifacts"] = {"teacher": str(teacher_path), "class_vectors": str(out / CLASS_VECTORS),
                            "student": str(student_path)}

    log.info("[7/7] export and report")
    onnx_path, diff = _try_export(student_path, out / CLASS_VECTORS, out / "student.onnx", student.clip)
    if onnx_path:
        metrics["artifacts"]["onnx"] = str(onnx_path)
        metrics["onnx_max_abs_logit_diff"] = diff
    metrics["seconds"] = time.perf_counter() - t_start
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, cfg)
    return metrics


def _stage_configs(cfg: DemoConfig, out: Path):
    """The teacher's, the student's and the label-free students' configs, each checked."""
    from promptkd.stages.distill import DistillConfig
    from promptkd.stages.teacher import TeacherConfig

    t_set, d_set = stage_settings(cfg, out.resolve())
    tcfg = TeacherConfig.from_dict({**t_set, "train": {**(t_set.get("train") or {}), "progress": cfg.progress}},
                                   "demo teacher settings")
    dcfg = DistillConfig.from_dict({**d_set, "train": {**d_set["train"], "progress": cfg.progress}})
    extra_cfgs = {k: DistillConfig.from_dict({**v, "train": {**v["train"], "progress": cfg.progress}})
                  for k, v in label_free_settings(cfg, out.resolve()).items()}
    return tcfg, dcfg, extra_cfgs


def _label_free_students(cfg: DemoConfig, out: Path, protocol, extra_cfgs: dict) -> dict:
    """The teacher's plain CLIP as a teacher: its class vectors and cache, then the student distilled
    from it alone (no labels anywhere) and the student of both teachers together."""
    from promptkd.models import load_clip
    from promptkd.models.teachers import ZeroShotTeacher
    from promptkd.stages.class_vectors import write_class_vectors
    from promptkd.stages.distill import baseline_table, check_distill, run_distill

    log.info("[5b] the teacher's plain CLIP as a teacher: class vectors%s",
             f", teacher cache of {cfg.cache_views} views per image" if cfg.cache_views else "")
    t0 = time.perf_counter()
    plain = ZeroShotTeacher(load_clip(cfg.teacher.get("model", "toy-teacher"), cfg.teacher.get("weights", "toy")))
    write_class_vectors(plain, protocol.classnames, out / ZS_CLASS_VECTORS)
    if cfg.cache_views:
        _build_cache(plain, protocol, out / ZS_CACHE_DIR, cfg)
    seconds = {"zero_shot_teacher_outputs": time.perf_counter() - t0}
    metrics: dict = {}
    for name, folder in (("no_labels", NO_LABELS_DIR), ("two_teachers", BOTH_DIR)):
        if name in extra_cfgs:
            log.info("[5b] distillation: %s", name.replace("_", " "))
            t0 = time.perf_counter()
            run = run_distill(check_distill(extra_cfgs[name]), out / folder).metrics
            log.info("%s", baseline_table(run))
            metrics[f"student_{name}"] = _scores(run["results"]["last"])
            seconds[name] = time.perf_counter() - t0
    metrics["label_free_seconds"] = seconds
    return metrics


def _build_cache(teacher, protocol, cache_dir, cfg):
    """The teacher-output cache's folder (distillation opens and checks it)."""
    from promptkd.stages.cache import CacheSpec, build_teacher_cache

    shutil.rmtree(cache_dir, ignore_errors=True)  # a demo run is always fresh: the teacher was just retrained
    return build_teacher_cache(teacher, protocol.train, None, cache_dir,
                               CacheSpec(views=cfg.cache_views, seed=cfg.seed), progress=cfg.progress)


def _try_export(student_path, cv_path, onnx_path, student_clip):
    """ONNX export of the distilled classifier, with a parity check; skipped if onnx is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise_if_interrupted()  # a Ctrl-C that cut the import short is not "missing"
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
        f"teacher tuned on {cfg.teacher.get('shots', 16)} shots per base class; student distilled on {cfg.n_train} unlabelled images "
        "per class (all classes, labels unused). Accuracy in % on the test split.",
        "",
        "| model | base | novel | HM |",
        "|---|---|---|---|",
        _row("student zero-shot (toy-student CLIP)", metrics["student_zeroshot"]),
        _row("teacher zero-shot (toy-teacher CLIP)", metrics["teacher_zeroshot"]),
        _row("teacher, PromptSRC-tuned", metrics["teacher"]),
        _row("student, distilled (PromptKD)", metrics["student"]),
        *([_row("student distilled from the zero-shot teacher, no labels", metrics["student_no_labels"])]
          if "student_no_labels" in metrics else []),
        *([_row("student distilled from both teachers (tuned + zero-shot)", metrics["student_two_teachers"])]
          if "student_two_teachers" in metrics else []),
        "",
        "| image tower | parameters | images/s (CPU, 1 thread) |",
        "|---|---|---|",
        f"| teacher | {metrics['teacher_params']:,} | {metrics['teacher_images_per_s']:.0f} |",
        f"| student (+ projector) | {metrics['student_params']:,} | {metrics['student_images_per_s']:.0f} |",
        "",
        f"Distillation: {metrics['distillation']['epochs']} epochs over {metrics['distillation']['unlabelled_images']} "
        f"unlabelled images; teacher outputs: {metrics['distillation']['teacher']}.",
        "",
        *([f"WARNING: {metrics['below_baseline']}", ""] if metrics.get("below_baseline") else []),
        f"Student speed-up per image: {metrics['student_images_per_s'] / metrics['teacher_images_per_s']:.1f}x. "
        f"Total time: {metrics['seconds']:.0f} s.",
        "",
        "![results](report.png)",
        "",
        "Every stage again, from this folder, with the same numbers: `sh stages.sh` (the commands below).",
        "`configs/teacher.yaml` and `configs/distill.yaml` are the stage settings, e.g.",
        "`promptkd distill --config configs/distill.yaml --kd-weight 10 --out student-kd10`.",
        "",
        "```bash",
        *stage_commands(cfg),
        "```",
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


def register(sub) -> None:
    from promptkd.options import add_config_options, add_output_options, non_negative_int

    p = sub.add_parser("demo", help="run the whole method on the embedded toy world (offline, minutes on a CPU)",
                       description="Teacher tuning, class vectors, distillation, evaluation, export and a report, "
                                   "on a procedurally generated world with two shipped tiny CLIPs (on the CPU).")
    add_output_options(p, "dir", required=False, what="demo", help="output folder (default: demo-out)")
    add_config_options(p, example="configs/demo/toy.yaml (the default preset)")
    p.add_argument("--seed", type=int, default=None, help="the preset's seed (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for smoke tests, not for numbers)")
    p.add_argument("--teacher-cache-views", type=non_negative_int, default=None, metavar="K",
                   help="views per image in the teacher-output cache (default 8; 0: online teacher)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run, out="demo-out")


def _run(args) -> int:
    from promptkd.runs import claim_folder

    if args.device not in (None, "auto", "cpu"):
        log.warning("the demo runs on the CPU (its report compares CPU speeds); --device %s is not used", args.device)
    sets = list(QUICK if args.quick else []) + list(args.set or [])
    if args.seed is not None:
        sets.append(f"seed={args.seed}")
    if args.teacher_cache_views is not None:
        sets.append(f"cache_views={args.teacher_cache_views}")
    sets += [f"threads={args.threads}", f"progress={str(not args.no_progress).lower()}"]
    cfg = DemoConfig.load(args.config, sets)  # the settings are checked before the folder is touched
    claim = claim_folder(args.out, DEMO_OUTPUTS, overwrite=args.overwrite, what="demo", finished="report.md",
                         command="demo")
    metrics = run_demo(claim.prepare(), cfg)
    print((Path(args.out) / "report.md").read_text())
    print(summary_table(metrics))
    print(f"(all numbers: {Path(args.out) / 'metrics.json'})")
    return 0


SUMMARY_ROWS = (("student_zeroshot", "student CLIP, zero-shot"), ("teacher_zeroshot", "teacher CLIP, zero-shot"),
                ("teacher", "teacher, PromptSRC-tuned"), ("student", "student, distilled (PromptKD)"))
EXTRA_ROWS = (("student_no_labels", "student, zero-shot teacher, no labels"),
              ("student_two_teachers", "student, both teachers"))  # only where the preset ran them


def summary_table(metrics: dict) -> str:
    """The demo's last word: test accuracy (%) of every model it made, base / novel / HM, one decimal."""
    rows = SUMMARY_ROWS + tuple(row for row in EXTRA_ROWS if row[0] in metrics)
    width = max(len(label) for _, label in rows)
    lines = [f"{'model':<{width}}  {'base':>5}  {'novel':>5}  {'HM':>5}"]
    def cell(value) -> str:
        return f"{value:>5.1f}" if isinstance(value, (int, float)) else f"{'-':>5}"

    lines += [f"{label:<{width}}  " + "  ".join(cell((metrics.get(key) or {}).get(k)) for k in ("base", "novel", "hm"))
              for key, label in rows]
    return "\n".join(lines)
