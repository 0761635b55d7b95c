"""Stage II: distil a prompt-tuned teacher into a small student on unlabelled images.

The student (frozen small CLIP image tower + deep vision prompts + projector) is trained only by
the KL between its logits and the teacher's on the same augmented batch. Both use the teacher's
stored class vectors as classifier, so the teacher's text tower never runs while training (the
official code re-encoded every class prompt at every step, official-promptkd.md §6.1).

With a teacher cache (promptkd.stages.cache) the teacher's logits come from its stored image
features for a replayed view, and its image tower does not run either.

Before training, the run measures its baseline on the test split: the student's own CLIP zero-shot
and the teacher through the class vectors. After it, one table puts the distilled student between
the two, and a student that ends below its zero-shot baseline is a warning, not a silent loss.

`distill(cfg, out_dir)` is the file-to-file stage behind `promptkd distill`; `distill_models`
is the in-process variant for models and item lists already in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.artifacts import load_artifact, read_json, write_json
from promptkd.data.protocols import PROTOCOLS, EvalSplit, Protocol, align_class_vectors, build_protocol
from promptkd.engine.config import CHECKPOINT_NAME, COMPILE_MODES, TrainConfig
from promptkd.errors import PromptKDError
from promptkd.settings import (
    check_field_types,
    check_known_keys,
    check_ranges,
    put_setting,
    random_weights,
    read_yaml,
    rename_keys,
    require_two_classes,
)
from promptkd.stages.cache import (
    CachedViewDataset,
    TeacherCache,
    require_cache_folder,
    teacher_train_transform,
)
from promptkd.stages.class_vectors import compute_class_vectors

if TYPE_CHECKING:  # torch and the models are imported where they run: `promptkd distill --help` stays fast
    import torch

    from promptkd.data.dataset import Item
    from promptkd.engine.loop import TrainResult
    from promptkd.models.wrappers import ClassVectors, Student, Teacher

log = logging.getLogger(__name__)

KD_REDUCTIONS = ("official", "batchmean")
STUDENT_FILE = "student.safetensors"
BEST_VAL_FILE = "student-best-val.safetensors"
CLASS_VECTORS_FILE = "class_vectors.safetensors"
METRICS_FILE = "metrics.json"
# What a distillation run writes into its folder (an --overwrite removes these first).
DISTILL_OUTPUTS = (STUDENT_FILE, BEST_VAL_FILE, CLASS_VECTORS_FILE, CHECKPOINT_NAME, METRICS_FILE, "metrics.jsonl",
                   "run.json", "tensorboard")

# scripts/promptkd/base2new_train.sh (comment): 200 for these, 1000 for the other eight datasets;
# xd_train.sh uses 1000 everywhere. configs/protocols/*.yaml state the same values explicitly.
OFFICIAL_KD_WEIGHT = 1000.0
OFFICIAL_KD_WEIGHT_200 = ("FGVCAircraft", "OxfordFlowers", "DescribableTextures")


# Any other dataset (a user's folder, a toy domain): the KL of one image weighs this much, whatever
# the class count: the paper's Eq. 3 with weight 1, and the official per-image weight on ImageNet.
# The official reduction divides by B*C, so the official 1000 weighs 1000/C per image: 1 on
# ImageNet, 10 on the 100-class benchmarks, but 167 on a 6-class folder, where issue #16 saw it
# wreck the student. benchmarks/kd_rule.py measures the choice (docs/distill.md, "Your own dataset").
CUSTOM_KD_PER_IMAGE = 1.0


def official_kd_weight(dataset: str, protocol: str = "base2novel") -> float:
    """The KD weight the official scripts use for `dataset` under `protocol`."""
    from promptkd.data.registry import canonical_name

    if protocol != "base2novel" or not is_benchmark(dataset):
        return OFFICIAL_KD_WEIGHT
    return 200.0 if canonical_name(dataset) in OFFICIAL_KD_WEIGHT_200 else OFFICIAL_KD_WEIGHT


def is_benchmark(dataset: str) -> bool:
    """One of the paper's datasets (the 11 benchmarks and the ImageNet variants), by name."""
    from promptkd.data.registry import canonical_name

    if ":" in dataset:
        return False
    try:
        canonical_name(dataset)
    except PromptKDError:
        return False
    return True


def default_kd_weight(dataset: str, protocol: str, n_classes: int, reduction: str = "official") -> float:
    """The KD weight when none is given. The paper's datasets: the official weight (its per-image
    value 1000/C or 200/C under `batchmean`); any other dataset: CUSTOM_KD_PER_IMAGE per image, i.e.
    that times C under the official reduction."""
    per_class = reduction == "official"
    if is_benchmark(dataset):
        weight = official_kd_weight(dataset, protocol)
        return weight if per_class else weight / max(1, n_classes)
    return CUSTOM_KD_PER_IMAGE * (max(1, n_classes) if per_class else 1)


def class_logits(features: torch.Tensor, class_vectors: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """logit_scale * normalised features @ class_vectors.T, in fp32 even under autocast.

    With a scale of 100, bf16 logits would be off by up to ~0.5; the product is tiny (B x d x C).
    """
    import torch

    with torch.autocast(features.device.type, enabled=False):
        return logit_scale.float() * features.float() @ class_vectors.to(features.device, torch.float32).T


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            weight: float = 1.0, reduction: str = "official") -> torch.Tensor:
    """weight * T^2 * KL(teacher || student).

    official: the summed KL divided by B*C (the official code's `kl_div(sum) / numel`);
    batchmean: the summed KL divided by B (the paper's Eq. 3), i.e. official * C.
    Computed in fp32 whatever the autocast dtype (the official code ran it in fp16).
    """
    import torch.nn.functional as F

    if reduction not in KD_REDUCTIONS:
        raise PromptKDError(f"kd reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    denom = student_logits.numel() if reduction == "official" else student_logits.shape[0]
    return weight * t * t * kl / denom


class PairedViews:
    """The same random crop and flip rendered for the student's and the teacher's input format
    (a map-style dataset for DataLoader).

    Only needed when the two CLIPs normalise or size images differently; the official pair
    (B/16, L/14) shares one tensor.
    """

    def __init__(self, items, student_tf, teacher_tf, seed: int):
        from promptkd.data.dataset import ImageDataset

        self.base = ImageDataset(items, student_tf, seed=seed, train=True)
        self.teacher_tf = teacher_tf

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def set_on_bad_image(self, policy: str) -> None:
        self.base.set_on_bad_image(policy)

    def unreadable_count(self) -> int:
        return self.base.unreadable_count()

    def __len__(self) -> int:
        return len(self.base)

    def _draw(self, index: int, j: int):
        from promptkd.data.dataset import ImageSource

        source = ImageSource(self.base.items[j][0])
        x_s, view = self.base.transform.draw(source, self.base.generator_for(index))
        return x_s, self.teacher_tf.render(source, view)

    def __getitem__(self, index: int):  # an unreadable image: see ImageDataset
        from promptkd.data.dataset import read_item

        (x_s, x_t), label, used = read_item(self.base.items, index, self.base.on_bad_image, self.base.unreadable,
                                            load=lambda j: self._draw(index, j))
        return x_s, x_t, label, used


def _same_input(a, b) -> bool:
    keys = ("size", "mean", "std", "interpolation", "scale", "ratio", "renderer")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


@dataclass
class DistillResult:
    student_path: Path
    metrics: dict
    train: TrainResult


def _trainable(student: Student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.trainable_tensors().items()}


def _load_trainable(student: Student, tensors: dict[str, torch.Tensor], source: str) -> None:
    student.image.prompts.load_tensors(tensors, "vision", source)
    student.projector.load_state_dict({k.removeprefix("projector."): v for k, v in tensors.items()
                                       if k.startswith("projector.")})


def _best_epoch(history: list[dict], key: str) -> dict | None:
    """First epoch with the highest `key` (Dassl saves a best model only on strict improvement)."""
    best = None
    for rec in history:
        if key in rec and (best is None or rec[key] > best[key]):
            best = rec
    return best


def _labelled(splits: dict[str, EvalSplit]) -> bool:
    return any(it.label >= 0 for s in splits.values() for it in s.items)


def _check_teacher_match(cv: ClassVectors, teacher: Teacher, student: Student) -> None:
    from promptkd.models.wrappers import check_same_teacher

    if cv.dim != teacher.dim:
        raise PromptKDError(f"class vectors have dim {cv.dim}, the teacher's embedding has dim {teacher.dim}")
    if student.projector.out_dim != teacher.dim:
        raise PromptKDError(f"student projects to dim {student.projector.out_dim}, the teacher's is {teacher.dim}")
    if cv.teacher:
        check_same_teacher(cv.teacher, teacher.identity(), "class vectors come from another teacher", "vectors")


def distill_models(
    teacher: Teacher,
    student: Student,
    class_vectors: ClassVectors,
    train_items: Sequence[Item],
    out_dir: str | Path,
    *,
    val_items: Sequence[Item] = (),
    test_items: Sequence[Item] = (),
    protocol: Protocol | None = None,
    train: TrainConfig | None = None,
    temperature: float = 1.0,
    kd_weight: float = OFFICIAL_KD_WEIGHT,
    kd_reduction: str = "official",
    select_on_val: bool = True,
    official_best_on_test: bool = False,
    eval_batch_size: int = 100,
    resume: bool = False,
    meta: dict | None = None,
    teacher_cache: TeacherCache | str | Path | None = None,
    baseline: bool = True,
) -> DistillResult:
    """Distil `teacher` into `student` (both already on their device) on `train_items`.

    Val/test splits come from `protocol` when given, else from `val_items` / `test_items`
    scored over all classes. Each epoch the student is evaluated on the val split (never on
    test) and the best-on-val student is kept; with `official_best_on_test` the test splits are
    evaluated every epoch too, to report the official best-on-test number (§6.2), labelled as such.
    `teacher_cache` (a TeacherCache or its folder, built over `train_items`): replay its stored
    views and features instead of running the teacher's image tower; the teacher is then moved to
    the CPU once the baseline is measured.
    `baseline`: before training, score the student's own CLIP zero-shot and the teacher on the
    test split (metrics.json "baseline"; one extra pass of each over the test images).
    Writes student.safetensors (last epoch, the reported model), student-best-val.safetensors,
    class_vectors.safetensors, checkpoint, metrics.jsonl and metrics.json into `out_dir`.
    """
    import torch
    import torch.nn.functional as F

    from promptkd.data.dataset import ImageDataset
    from promptkd.data.transforms import transforms_for
    from promptkd.engine import distributed
    from promptkd.engine.loop import autocast, train_loop
    from promptkd.metrics import evaluate_splits
    from promptkd.models.wrappers import ClassVectors

    cfg = train or TrainConfig()
    out_dir = Path(out_dir)
    if kd_reduction not in KD_REDUCTIONS:
        raise PromptKDError(f"kd reduction must be one of {KD_REDUCTIONS}, got {kd_reduction!r}")
    if kd_reduction == "batchmean" and kd_weight > 10:
        log.warning("kd_reduction=batchmean with kd weight %g: batchmean is C times the official loss, so the "
                    "official weights (1000/200) are far too large; the paper's formula is weight 1", kd_weight)
    if protocol is None:
        protocol = Protocol("cross", "custom", list(class_vectors.classnames), list(train_items),
                            {"val": EvalSplit(list(val_items))} if val_items else {},
                            {"accuracy": EvalSplit(list(test_items))} if test_items else {})
    _check_teacher_match(class_vectors, teacher, student)
    classifier = align_class_vectors(class_vectors, protocol)
    device = next(student.parameters()).device
    W = classifier.to(device)
    dist_info = distributed.current()
    main = dist_info.is_main

    # Training views: the fast uint8 renderer (normalised on the device in loss_fn); evaluation: the official one.
    student_tf, student_test_tf = transforms_for(student.clip.preprocess_cfg, renderer="uint8")
    teacher_tf = teacher_train_transform(teacher)
    paired = not _same_input(student_tf, teacher_tf)
    cache = _open_cache(teacher_cache, teacher, train_items, teacher_tf)
    if cache is not None:  # the student renders the recorded crop with its own transform
        dataset = CachedViewDataset(train_items, student_tf, cache, cfg.seed)
    elif paired:
        dataset = PairedViews(train_items, student_tf, teacher_tf, cfg.seed)
    else:
        dataset = ImageDataset(train_items, student_tf, seed=cfg.seed, train=True)
    teacher.eval()
    t_scale = teacher.logit_scale.to(device)

    normalize_s, normalize_t = student_tf.normalizer(device), teacher_tf.normalizer(device)

    def teacher_features(batch, x_s):
        if cache is not None:  # stored in fp16: renormalise
            return F.normalize(batch[1].float(), dim=-1)
        return teacher.encode_images(normalize_t(batch[1]) if paired else x_s)

    def loss_fn(batch):  # the whole step's forward; train_loop may compile it (cfg.compile)
        x_s = normalize_s(batch[0])  # uint8 from the loader -> normalised, on the device
        with torch.no_grad():
            t_logits = class_logits(teacher_features(batch, x_s), W, t_scale)
        s_logits = class_logits(student(x_s), W, student.logit_scale)
        loss = kd_loss(s_logits, t_logits, temperature, kd_weight, kd_reduction)
        agreement = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
        return loss, {"agreement": agreement.detach()}

    def evaluate(splits):
        def encode(x):
            with autocast(device, cfg.precision):
                return student(x)
        return evaluate_splits(encode, W, splits, student_test_tf, batch_size=eval_batch_size, device=device,
                               num_workers=cfg.num_workers, progress=cfg.progress)

    settings = {"temperature": float(temperature), "kd_weight": float(kd_weight), "kd_reduction": kd_reduction,
                "teacher": teacher.identity(), "classnames": list(protocol.classnames),
                "teacher_cache": cache.identity() if cache is not None else None,
                "student": {"clip": student.clip.identity(), "prompts": student.prompt_config}}
    ckpt = out_dir / CHECKPOINT_NAME
    history: list[dict] = []
    before = None
    if resume and ckpt.is_file():
        _, ck_meta = load_artifact(ckpt, kind="checkpoint")
        saved = ck_meta.get("distill") or {}
        diff = [k for k in settings if k in saved and saved[k] != settings[k]]
        if diff:
            raise PromptKDError(f"{ckpt}: cannot resume: the run was started with other {', '.join(diff)}")
        history = list(ck_meta.get("history") or [])
        before = ck_meta.get("baseline")
    if main and baseline and before is None and _labelled(protocol.test):
        with torch.random.fork_rng(devices=[]):  # a run with or without a baseline trains the same
            before = measure_baseline(teacher, student, W, protocol, device=device, precision=cfg.precision,
                                      batch_size=eval_batch_size, num_workers=cfg.num_workers,
                                      progress=cfg.progress)
    if cache is not None and device.type != "cpu":  # its image tower never runs: free the device
        teacher.cpu()
    distributed.barrier()
    has_val = select_on_val and _labelled(protocol.val)
    best = {"val": (_best_epoch(history, "val") or {}).get("val", float("-inf"))}
    file_meta = {"teacher": settings["teacher"], "classnames": list(protocol.classnames),
                 "dataset": protocol.dataset, "protocol": protocol.name, "kd": {k: settings[k] for k in
                 ("temperature", "kd_weight", "kd_reduction")}, **(meta or {})}

    def on_epoch_end(epoch: int) -> dict:
        if not main:
            return {}
        record = {}
        if has_val:
            record["val"] = evaluate(protocol.val).get("val", float("nan"))
            if record["val"] > best["val"]:
                best["val"] = record["val"]
                student.save(out_dir / BEST_VAL_FILE, epoch=epoch + 1, selected_on="val", **file_meta)
        if official_best_on_test:
            record.update({f"test_{k}": v for k, v in evaluate(protocol.test).items()})
        return record

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ClassVectors(classifier.cpu(), protocol.classnames, class_vectors.teacher).save(out_dir / CLASS_VECTORS_FILE)
    result = train_loop(student, loss_fn, dataset, cfg, out_dir, resume=resume, on_epoch_end=on_epoch_end,
                        desc="distill", checkpoint_meta={"distill": settings, "baseline": before},
                        compile_default=cache is not None)  # auto: the cached step compiles on CUDA

    student_path = out_dir / STUDENT_FILE
    metrics: dict = {}
    if main:
        student.eval()
        student.save(student_path, epoch=cfg.epochs, selected_on="last", **file_meta)
        results: dict = {}
        if _labelled(protocol.test):
            results["last"] = {"epoch": cfg.epochs, **evaluate(protocol.test)}
            chosen = _best_epoch(result.history, "val") if has_val else None
            if chosen is not None:
                if chosen["epoch"] == cfg.epochs:
                    scores = {k: v for k, v in results["last"].items() if k != "epoch"}
                else:
                    last_state = _trainable(student)
                    _load_trainable(student, load_artifact(out_dir / BEST_VAL_FILE, kind="student")[0], BEST_VAL_FILE)
                    scores = evaluate(protocol.test)
                    _load_trainable(student, last_state, "last epoch")
                results["best_val"] = {"epoch": chosen["epoch"], "val": chosen["val"], **scores}
            if official_best_on_test:
                results["official_best_on_test"] = _official_best(result.history, protocol.name)
        metrics = {
            "kind": "distill_metrics", "dataset": protocol.dataset, "protocol": protocol.name, "seed": cfg.seed,
            **{k: settings[k] for k in ("temperature", "kd_weight", "kd_reduction")},
            "teacher": settings["teacher"], "student": settings["student"], "classes": len(protocol.classnames),
            "train_images": len(train_items), "teacher_cache": settings["teacher_cache"], "results": results,
            "baseline": before, "history": result.history,
            "train": {"steps": result.steps, "skipped_steps": result.skipped_steps, "seconds": result.seconds,
                      "config": asdict(cfg)}, **(meta or {}),
        }
        write_json(out_dir / METRICS_FILE, metrics)
        _warn_if_below_baseline(metrics)
    distributed.barrier()
    return DistillResult(student_path, metrics, result)


def measure_baseline(teacher: Teacher, student: Student, classifier: torch.Tensor, protocol: Protocol, *,
                     device: torch.device, precision: str = "fp32", batch_size: int = 100, num_workers: int = 0,
                     progress: bool = True) -> dict:
    """What distillation starts from and aims at, on the protocol's test split: the student's own
    CLIP zero-shot (its text tower, "a photo of a {}.") and the teacher through the class vectors."""
    from promptkd.data.transforms import transforms_for
    from promptkd.engine.loop import autocast
    from promptkd.metrics import DEFAULT_TEMPLATES, evaluate_splits, zero_shot_scores

    log.info("baseline: student zero-shot and teacher on %d test images",
             sum(len(s.items) for s in protocol.test.values()))
    t_device = next(teacher.parameters()).device
    with autocast(device, precision):
        zero_shot = zero_shot_scores(student.clip, protocol.classnames, protocol.test, batch_size=batch_size,
                                     device=device, num_workers=num_workers, progress=progress,
                                     announce="baseline, student zero-shot")
    with autocast(t_device, precision):
        taught = evaluate_splits(teacher.encode_images, classifier, protocol.test,
                                 transforms_for(teacher.clip.preprocess_cfg)[1], batch_size=batch_size,
                                 device=t_device, num_workers=num_workers, progress=progress,
                                 announce="baseline, teacher")
    return {"student_zero_shot": zero_shot, "teacher": taught, "templates": list(DEFAULT_TEMPLATES)}


def _headline(scores: dict) -> tuple[str, float] | None:
    """The number a run is judged by: HM for base-to-novel, else the (first) accuracy."""
    key = "hm" if "hm" in scores else next((k for k, v in scores.items() if isinstance(v, float)), None)
    return (key, scores[key]) if key is not None else None


def below_baseline(metrics: dict) -> str | None:
    """A one-line warning when the distilled student (last epoch) scores below its zero-shot baseline."""
    zero_shot = ((metrics.get("baseline") or {}).get("student_zero_shot")) or {}
    last = (metrics.get("results") or {}).get("last") or {}
    head, ref = _headline(last), _headline(zero_shot)
    if head is None or ref is None or head[0] != ref[0] or not head[1] < ref[1]:
        return None
    name = "HM" if head[0] == "hm" else head[0]
    return (f"the distilled student ({name} {head[1]:.2f}) is below its own zero-shot baseline ({name} "
            f"{ref[1]:.2f}): distillation hurt it; try a smaller --kd-weight (now {metrics.get('kd_weight'):g}) "
            "or learning rate")


def _warn_if_below_baseline(metrics: dict) -> None:
    message = below_baseline(metrics)
    if message:
        log.warning("WARNING: %s", message)


def baseline_table(metrics: dict) -> str:
    """The run in one table: student zero-shot, teacher, distilled student (last, and best on val),
    with the warning line under it when the student ended below its zero-shot baseline."""
    base = metrics.get("baseline") or {}
    results = metrics.get("results") or {}
    rows = [("student zero-shot", base.get("student_zero_shot")), ("teacher", base.get("teacher")),
            ("distilled student (last epoch)", results.get("last"))]
    best = results.get("best_val")
    if best and best.get("epoch") != (results.get("last") or {}).get("epoch"):
        rows.append((f"distilled student (best val, epoch {best['epoch']})", best))
    rows = [(name, {k: v for k, v in r.items() if k not in ("epoch", "val") and isinstance(v, float)})
            for name, r in rows if r]
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for _, r in rows for k in r))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{('HM' if k == 'hm' else k):>8}" for k in keys)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{r[k]:>8.2f}" if k in r else f"{'-':>8}" for k in keys)
              for name, r in rows]
    message = below_baseline(metrics)
    if message:
        lines.append(f"WARNING: {message}")
    return "\n".join(lines)


def _open_cache(cache, teacher: Teacher, items, teacher_tf) -> TeacherCache | None:
    """The cache, checked against this teacher, image list and teacher transform."""
    if cache is None:
        return None
    if isinstance(cache, TeacherCache):
        cache.check(teacher.identity(), items, teacher_tf)
        return cache
    cache = TeacherCache(cache, teacher.identity(), items)
    cache.check(transform=teacher_tf)
    return cache


def _official_best(history: list[dict], protocol: str) -> dict:
    """The official number: the epoch with the best (base) *test* accuracy, and its novel accuracy."""
    from promptkd.metrics import harmonic_mean

    key = "test_base" if protocol == "base2novel" else "test_accuracy"
    rec = _best_epoch(history, key) or {}
    out = {"epoch": rec.get("epoch"), **{k.removeprefix("test_"): v for k, v in rec.items() if k.startswith("test_")}}
    if "base" in out and "novel" in out:
        out["hm"] = harmonic_mean(out["base"], out["novel"])
    out["note"] = "selected on test data, as the official code does; optimistic, for comparison only"
    return out


# ----------------------------------------------------------------------------------------------
# File-to-file stage and configuration.


@dataclass
class DistillConfig:
    """Everything `promptkd distill` needs; YAML presets in configs/distill/ set these keys."""

    dataset: str = ""
    root: str | None = None
    protocol: str = "base2novel"
    shots: int = 0  # K unlabelled images per class (0: all)
    teacher: str = ""  # teacher file or run folder
    teacher_model: str | None = None  # override the CLIP the teacher recorded (model name / config JSON)
    teacher_weights: str | None = None  # ... and its weights (when the recorded file moved)
    class_vectors: str | None = None  # None: encode the class names once with the teacher before training
    teacher_cache: str | None = None  # folder from `promptkd cache`; None: run the teacher online
    student_model: str = "ViT-B-16"
    student_weights: str | None = "openai"  # tag, local file, or none/null (random, seeded by train.seed)
    vision_depth: int = 9
    n_ctx_vision: int = 4
    temperature: float = 1.0
    kd_weight: float | None = None  # None: official on the paper's datasets, else per image (default_kd_weight)
    kd_reduction: str = "official"
    precision: str = "auto"  # auto: bf16 (fp16 without bf16) on CUDA, fp32 elsewhere
    select_on_val: bool = True
    official_best_on_test: bool = False
    eval_batch_size: int = 100
    baseline: bool = True  # score the student's zero-shot CLIP and the teacher on test before training
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            if "precision" in self.train:
                raise PromptKDError("set `precision` at the top level of a distill config, not under `train`")
            self.train = _from_dict(TrainConfig, self.train, "train")
        check_field_types(self, "distill settings")
        if self.protocol not in PROTOCOLS:
            raise PromptKDError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.kd_reduction not in KD_REDUCTIONS:
            raise PromptKDError(f"kd_reduction must be one of {', '.join(KD_REDUCTIONS)}, got {self.kd_reduction!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise PromptKDError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        check_ranges(self, "distill settings", {"shots": (">=", 0), "vision_depth": (">=", 0),
                                                 "n_ctx_vision": (">=", 1), "temperature": (">", 0),
                                                 "kd_weight": (">=", 0), "eval_batch_size": (">=", 1)})
        if random_weights(self.student_weights):
            self.student_weights = None

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        return _from_dict(cls, rename_keys(d, _OLD_KEYS, "distill config"), "distill config")

    @classmethod
    def from_yaml(cls, *paths: str | Path, overrides: dict | None = None) -> DistillConfig:
        """Merge YAML presets left to right (the `train:` section key by key), then `overrides`."""
        merged: dict = {}
        for layer in [*(read_yaml(p) for p in paths), overrides or {}]:
            for k, v in layer.items():
                if k == "train" and isinstance(v, dict):
                    merged["train"] = {**merged.get("train", {}), **v}
                else:
                    merged[k] = v
        return cls.from_dict(merged)


# Setting names before the vocabulary of docs/cli.md (read, with a warning, until 0.3).
_OLD_KEYS = {"num_shots": "shots", "teacher_clip_model": "teacher_model", "teacher_clip": "teacher_weights",
             "student_pretrained": "student_weights"}


def _from_dict(cls, d: dict, what: str):
    check_known_keys(cls, d, what, "key")
    return cls(**d)


def _check_required(cfg: DistillConfig) -> None:
    if not cfg.dataset:
        raise PromptKDError("distill: no dataset (--dataset or `dataset:` in a config)")
    if not cfg.teacher:
        raise PromptKDError("distill: no teacher (--teacher FILE|DIR or `teacher:` in a config)")


def distill(cfg: DistillConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Load teacher, class vectors and data, build the student, distil; returns the student file.

    Under torchrun every process calls this; it joins the process group itself.
    """
    import torch

    from promptkd.engine import distributed
    from promptkd.engine.loop import resolve_device, resolve_precision
    from promptkd.inputs import artifact_path, load_teacher
    from promptkd.models import load_clip
    from promptkd.models.wrappers import ClassVectors, Student
    from promptkd.runs import (
        dataset_record,
        file_digest,
        file_record,
        finish_run_record,
        promptkd_files,
        write_run_record,
    )

    _check_required(cfg)
    teacher_path = artifact_path(cfg.teacher, "teacher")
    device = resolve_device(cfg.train.device)
    info = distributed.init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    train_cfg = TrainConfig(**{**asdict(cfg.train), "precision": resolve_precision(cfg.precision, device)})

    teacher = load_teacher(teacher_path, cfg.teacher_model, cfg.teacher_weights, device)
    cv = ClassVectors.load(cfg.class_vectors, teacher=teacher, dim=teacher.dim) if cfg.class_vectors else None
    protocol = build_protocol(cfg.protocol, cfg.dataset, cfg.root, num_shots=cfg.shots, seed=train_cfg.seed,
                              reference_classnames=cv.classnames if cv is not None else None)
    if not protocol.classnames:
        raise PromptKDError(f"{cfg.dataset}: no class names; give --class-vectors for unlabelled images")
    require_two_classes(protocol.classnames, cfg.dataset)
    if cv is None:  # pre-store once, after the teacher's prompts are loaded (§6.1)
        cv = compute_class_vectors(teacher, protocol.classnames)
    kd_weight = cfg.kd_weight
    if kd_weight is None:
        kd_weight = default_kd_weight(cfg.dataset, cfg.protocol, len(protocol.classnames), cfg.kd_reduction)
        if not is_benchmark(cfg.dataset):
            log.info("kd weight %g: %g per image for a dataset outside the paper's (the official 1000 would be "
                     "%.3g per image with %d classes; --kd-weight sets another)", kd_weight, CUSTOM_KD_PER_IMAGE,
                     OFFICIAL_KD_WEIGHT / max(1, len(protocol.classnames)), len(protocol.classnames))

    torch.manual_seed(train_cfg.seed)  # prompt and projector initialisation
    clip = load_clip(cfg.student_model, cfg.student_weights, init_seed=train_cfg.seed)
    student = Student(clip, teacher.dim, cfg.vision_depth, cfg.n_ctx_vision).to(device)
    if info.is_main:
        write_run_record(out_dir, "distill", {
            "teacher": file_record(teacher_path), "teacher_clip": teacher.clip.source, "student_clip": clip.source,
            "class_vectors": file_record(cfg.class_vectors) if cfg.class_vectors else None,
            "teacher_cache": {"path": str(Path(cfg.teacher_cache).resolve()),
                              "manifest_sha256": file_digest(Path(cfg.teacher_cache) / "manifest.json")}
            if cfg.teacher_cache else None,
            "dataset": dataset_record(protocol.dataset, cfg.root, protocol.train, protocol=cfg.protocol,
                                      shots=cfg.shots, seed=train_cfg.seed)})
    config = asdict(cfg)
    config.update(kd_weight=kd_weight, precision=train_cfg.precision, train=asdict(train_cfg))
    result = distill_models(
        teacher, student, cv, protocol.train, out_dir, protocol=protocol, train=train_cfg,
        temperature=cfg.temperature, kd_weight=kd_weight, kd_reduction=cfg.kd_reduction,
        select_on_val=cfg.select_on_val, official_best_on_test=cfg.official_best_on_test,
        eval_batch_size=cfg.eval_batch_size, resume=resume, meta={"config": config},
        teacher_cache=cfg.teacher_cache, baseline=cfg.baseline,
    )
    if info.is_main:
        finish_run_record(out_dir, [p.name for p in promptkd_files(Path(out_dir), DISTILL_OUTPUTS)])
    return result.student_path


# ----------------------------------------------------------------------------------------------
# `promptkd distill`

_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "seed", "num_workers", "device", "max_steps_per_epoch",
                "checkpoint_every", "on_nonfinite", "on_bad_image", "compile")


def config_from_args(args) -> DistillConfig:
    """YAML preset(s), then --set KEY=VALUE, then the explicit options."""
    from promptkd.options import parse_set

    overrides: dict = {"train": {}}
    for key, value in parse_set(args.set):
        put_setting(overrides, key, value)
    top = {f.name for f in fields(DistillConfig)} - {"train"}
    overrides.update({k: v for k, v in vars(args).items() if k in top and v is not None})
    overrides["train"].update({k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None})
    if args.no_progress:
        overrides["train"]["progress"] = False
    if not overrides["train"]:
        del overrides["train"]
    return DistillConfig.from_yaml(*args.config, overrides=overrides)


def _run(args) -> int:
    from promptkd.engine import distributed
    from promptkd.engine.loop import resolve_device
    from promptkd.inputs import (
        artifact_path,
        check_clip_files,
        class_vectors_path,
        clip_inputs,
        dataset_inputs,
    )
    from promptkd.runs import check_apart, claim_folder

    cfg = config_from_args(args)  # types and ranges of every setting
    _check_required(cfg)
    resolve_device(cfg.train.device)
    teacher = artifact_path(cfg.teacher, "teacher")
    if cfg.class_vectors:
        class_vectors_path(cfg.class_vectors)
    if cfg.teacher_cache:
        require_cache_folder(cfg.teacher_cache, "--teacher-cache")
    check_clip_files(cfg.teacher_model, cfg.teacher_weights, "teacher")
    check_clip_files(cfg.student_model, cfg.student_weights, "student")
    data, roots = dataset_inputs(cfg.dataset, cfg.root)
    check_apart(args.out, {"teacher": teacher, "class vectors": cfg.class_vectors, "teacher cache": cfg.teacher_cache,
                           **data, **clip_inputs(cfg.teacher_model, cfg.teacher_weights, "teacher"),
                           **clip_inputs(cfg.student_model, cfg.student_weights, "student")}, roots=roots)
    claim = claim_folder(args.out, DISTILL_OUTPUTS, overwrite=args.overwrite, resume=args.resume,
                         what="distillation run", finished=STUDENT_FILE, marker=CHECKPOINT_NAME, command="distill")
    path = distill(cfg, claim.prepare(), resume=args.resume)
    if distributed.current().is_main:
        metrics = read_json(Path(args.out) / METRICS_FILE)
        results = metrics.get("results", {})
        print(f"student: {path}")
        for name, r in results.items():
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if isinstance(v, float))
            print(f"{name}: {shown}")
        table = baseline_table(metrics)
        if table:
            print(table)
    return 0


def register(sub) -> None:
    from promptkd.inputs import add_clip_args
    from promptkd.options import (
        PRECISIONS,
        add_config_options,
        add_model_options,
        add_output_options,
        deprecated,
        non_negative_float,
        non_negative_int,
        positive_float,
        positive_int,
    )

    p = sub.add_parser(
        "distill", help="distil a teacher into a small student on unlabelled images",
        description="Multi-GPU: torchrun --nproc_per_node N -m promptkd.cli distill ... "
                    "(the batch size is global and split across processes). The run folder (--out) records "
                    "what it was built from (run.json); eval and export take the folder alone.")
    add_config_options(p, several=True, example="configs/distill/vit_b16_c2_ep20_batch8_4ctx.yaml")
    add_output_options(p, "dir", resume=True, what="distillation run",
                       help="run folder (student, class vectors, checkpoint, metrics, run.json)")
    p.add_argument("--dataset", metavar="NAME",
                   help="benchmark name, or folder:PATH / images:PATH (unlabelled images) / split:FILE.json")
    p.add_argument("--root", help="data root holding the CoOp dataset folders")
    p.add_argument("--protocol", choices=PROTOCOLS)
    p.add_argument("--shots", type=non_negative_int, metavar="K", help="K unlabelled images per class (0: all)")
    p.add_argument("--teacher", metavar="PATH|DIR", help="teacher file or run folder")
    add_clip_args(p, "teacher")
    p.add_argument("--class-vectors", metavar="FILE", help="the teacher's stored class vectors")
    p.add_argument("--teacher-cache", metavar="DIR",
                   help="teacher features from `promptkd cache` (its image tower then never runs)")
    add_model_options(p, "student", default_note="default ViT-B-16 / openai")
    p.add_argument("--vision-depth", type=non_negative_int)
    p.add_argument("--n-ctx-vision", type=positive_int)
    p.add_argument("--temperature", type=positive_float)
    p.add_argument("--kd-weight", type=non_negative_float, help="default: the official per-dataset weight on the 11 benchmarks, 1 per image elsewhere")
    p.add_argument("--kd-reduction", choices=KD_REDUCTIONS)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=non_negative_int)
    p.add_argument("--max-steps-per-epoch", type=positive_int, metavar="N")
    p.add_argument("--checkpoint-every", type=non_negative_int, metavar="STEPS")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), help="NaN/inf loss or gradients: stop (default) or skip the batch")
    p.add_argument("--on-bad-image", choices=("substitute", "error"),
                   help="unreadable training image: use the next readable one (default, counted) or stop")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile the training step (CUDA graphs on CUDA); auto (default): on for "
                        "--teacher-cache runs on one CUDA GPU")
    p.add_argument("--eval-batch-size", type=positive_int)
    p.add_argument("--no-val", dest="select_on_val", action="store_const", const=False,
                   help="skip the per-epoch validation (and best-on-val selection)")
    p.add_argument("--official-best-on-test", action="store_const", const=True,
                   help="also evaluate test every epoch and report the official best-on-test number")
    deprecated(p, "--teacher-clip-model", "--teacher-model")
    deprecated(p, "--teacher-clip", "--teacher-weights")
    deprecated(p, "--student-pretrained", "--student-weights")
    deprecated(p, "--num-shots", "--shots", type=non_negative_int)
    p.add_argument("--no-baseline", dest="baseline", action="store_const", const=False,
                   help="skip the student zero-shot and teacher passes over the test split before training")
    p.set_defaults(func=_run, resume_marker=CHECKPOINT_NAME)
