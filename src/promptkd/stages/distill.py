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

`run_distill(check_distill(cfg), out)` is the file-to-file stage behind `promptkd distill` (it returns
the result; `distill(cfg, out_dir)` the student's path); `distill_models` is the in-process variant for
models and item lists already in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.artifacts import load_artifact
from promptkd.data.protocols import PROTOCOLS, EvalSplit, Protocol, align_class_vectors, build_protocol
from promptkd.data.views import ViewsOverImages
from promptkd.engine.config import CHECKPOINT_NAME, TrainConfig
from promptkd.errors import PromptKDError
from promptkd.kd import (  # noqa: F401  (re-exported: the names this module always had)
    CUSTOM_KD_PER_IMAGE,
    ENSEMBLE_MODES,
    KD_LOSSES,
    KD_REDUCTIONS,
    OFFICIAL_KD_WEIGHT,
    OFFICIAL_KD_WEIGHT_200,
    KDSettings,
    class_logits,
    default_kd_weight,
    is_benchmark,
    kd_loss,
    official_kd_weight,
)
from promptkd.options import (
    MODEL_METAVAR,
    PRECISIONS,
    PRESET_DEFAULT,
    TEMPLATES_HELP,
    TEMPLATES_METAVAR,
    WEIGHTS_METAVAR,
    model_option_help,
    old_keys,
)
from promptkd.runs import METRICS_FILE, RunFolder, run_outputs  # noqa: F401 (METRICS_FILE: re-exported)
from promptkd.settings import (
    add_setting_options,
    check_known_keys,
    merge_settings,
    random_weights,
    read_yaml,
    rename_keys,
    require_two_classes,
    setting,
    settings_from_args,
    validate,
)
from promptkd.stages.cache import (
    CachedViewDataset,
    TeacherCache,
    require_cache_folder,
    teacher_train_transform,
)
from promptkd.stages.class_vectors import compute_class_vectors
from promptkd.stages.teacher_choice import weight_list

if TYPE_CHECKING:  # torch and the models are imported where they run: `promptkd distill --help` stays fast
    import torch

    from promptkd.data.dataset import Item
    from promptkd.engine.loop import TrainResult
    from promptkd.models.wrappers import ClassVectors, Student, Teacher

log = logging.getLogger(__name__)

PROJECTOR_INITS = ("random", "text")
STUDENT_FILE = "student.safetensors"
BEST_VAL_FILE = "student-best-val.safetensors"
CLASS_VECTORS_FILE = "class_vectors.safetensors"
# The artifacts a distillation run writes into its folder (RunFolder.file); with the engine's files and
# the run's own they are all it writes (an --overwrite removes these first).
DISTILL_ARTIFACTS = (STUDENT_FILE, BEST_VAL_FILE, CLASS_VECTORS_FILE)
DISTILL_OUTPUTS = run_outputs(*DISTILL_ARTIFACTS)


class PairedViews(ViewsOverImages):
    """The same random crop and flip rendered for the student's and the teacher's input format
    (a map-style dataset for DataLoader).

    Only needed when the two CLIPs normalise or size images differently; the official pair
    (B/16, L/14) shares one tensor.
    """

    def __init__(self, items, student_tf, teacher_tf, seed: int):
        from promptkd.data.dataset import ImageDataset

        self.base = ImageDataset(items, student_tf, seed=seed, train=True)
        self.teacher_tf = teacher_tf

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
    """What a distillation returns: the student file, the metrics (metrics.json's content; {} off the
    main process) and the engine's record of the training."""

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


@dataclass
class DistillOptions:
    """distill_models's keyword options as plain values (see its docstring)."""

    val_items: Sequence[Item] = ()
    test_items: Sequence[Item] = ()
    protocol: Protocol | None = None
    train: TrainConfig | None = None
    kd: KDSettings = field(default_factory=KDSettings)
    select_on_val: bool = True
    official_best_on_test: bool = False
    eval_batch_size: int = 100
    resume: bool = False
    meta: dict | None = None
    teacher_cache: TeacherCache | str | Path | None = None
    baseline: bool = True
    more_teachers: Sequence[tuple[Teacher, ClassVectors, TeacherCache | str | Path | None]] = ()
    ensemble: str = "mean"
    ensemble_weights: Sequence[float] | None = None
    projector_init: str = "random"


def distill_models(
    teacher: Teacher,
    student: Student,
    class_vectors: ClassVectors,
    train_items: Sequence[Item],
    out_dir: str | Path | RunFolder,
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
    more_teachers: Sequence[tuple[Teacher, ClassVectors, TeacherCache | str | Path | None]] = (),
    ensemble: str = "mean",
    ensemble_weights: Sequence[float] | None = None,
    projector_init: str = "random",
    kd: KDSettings | None = None,
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
    `more_teachers`: (teacher, its class vectors over the same class names, its cache or None) of
    further teachers; their targets are combined with the first's (`ensemble`: mean of probabilities
    with `ensemble_weights`, or confidence-weighted per image, promptkd.kd.ensemble_log_probs). The
    student classifies with the first teacher's class vectors.
    `projector_init`: "random" (the official start) or "text": fit the projector on paired student and
    teacher text features first (promptkd.stages.projector_init), so distillation starts near the
    student's zero-shot instead of chance.
    `kd` (promptkd.kd.KDSettings): every KD setting at once; when given it replaces `temperature`,
    `kd_weight` and `kd_reduction`.
    Writes student.safetensors (last epoch, the reported model), student-best-val.safetensors,
    class_vectors.safetensors, checkpoint, metrics.jsonl and metrics.json into `out_dir` (a folder, or
    the RunFolder that owns it).
    """
    options = DistillOptions(
        val_items=val_items, test_items=test_items, protocol=protocol, train=train,
        kd=kd or KDSettings(temperature=temperature, kd_weight=kd_weight, kd_reduction=kd_reduction),
        select_on_val=select_on_val, official_best_on_test=official_best_on_test, eval_batch_size=eval_batch_size,
        resume=resume, meta=meta, teacher_cache=teacher_cache, baseline=baseline, more_teachers=more_teachers,
        ensemble=ensemble, ensemble_weights=ensemble_weights, projector_init=projector_init)
    return DistillRecipe(teacher, student, class_vectors, train_items, out_dir, options).run()


class DistillRecipe:
    """One distillation run in named phases, torchtune's recipe shape: `setup` (checks, classifier,
    teachers and training views), `prepare` (resume header, baseline, projector start), `loss` (the
    step's forward, run by the engine), `evaluate` / `on_epoch_end`, and `save_outputs` (student,
    metrics).
    The run's state lives on this object; the engine (promptkd.engine.loop) owns the loop itself, and
    the RunFolder (promptkd.runs) the folder: the recipe writes its files where that names them."""

    def __init__(self, teacher: Teacher, student: Student, class_vectors: ClassVectors, train_items: Sequence[Item],
                 out_dir: str | Path | RunFolder, options: DistillOptions):
        self.teacher, self.student, self.class_vectors = teacher, student, class_vectors
        self.run_folder = out_dir if isinstance(out_dir, RunFolder) else RunFolder(Path(out_dir), "distill",
                                                                                   DISTILL_ARTIFACTS)
        self.train_items, self.out_dir, self.opts = train_items, self.run_folder.path, options
        self.cfg, self.kd = options.train or TrainConfig(), options.kd

    def run(self) -> DistillResult:
        from promptkd.engine.loop import train_loop

        self.setup()
        self.prepare()
        result = train_loop(self.student, self.loss, self.dataset, self.cfg, self.out_dir, resume=self.opts.resume,
                            resume_header=self.resume_header, on_epoch_end=self.on_epoch_end, desc="distill",
                            checkpoint_meta={"distill": self.settings, "baseline": self.before},
                            compile_default=self.cache is not None)  # auto: the cached step compiles on CUDA
        return self.save_outputs(result)

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check the options, align the classifier to the protocol, open every teacher's targets."""
        from promptkd.data.transforms import transforms_for
        from promptkd.engine import distributed
        from promptkd.kd import ensemble_weights as normalised_weights

        o = self.opts
        _check_options(o, self.kd)
        self.weights = o.ensemble_weights
        if o.more_teachers or o.ensemble_weights:
            self.weights = normalised_weights(1 + len(o.more_teachers), o.ensemble_weights)
        self.protocol = o.protocol or Protocol(
            "cross", "custom", list(self.class_vectors.classnames), list(self.train_items),
            {"val": EvalSplit(list(o.val_items))} if o.val_items else {},
            {"accuracy": EvalSplit(list(o.test_items))} if o.test_items else {})
        _check_teacher_match(self.class_vectors, self.teacher, self.student)
        self.classifier = align_class_vectors(self.class_vectors, self.protocol)
        self.device = next(self.student.parameters()).device
        self.W = self.classifier.to(self.device)
        self.main = distributed.current().is_main
        # Training views: the fast uint8 renderer (normalised on the device in `loss`); evaluation: the official one.
        self.student_tf, self.student_test_tf = transforms_for(self.student.clip.preprocess_cfg, renderer="uint8")
        self.normalize_s = self.student_tf.normalizer(self.device)
        self._setup_teachers()
        self.settings = self._settings()

    def _setup_teachers(self) -> None:
        """Each teacher's logits for the views (online, or from its cache), and the dataset that serves them."""
        from promptkd.data.dataset import ImageDataset
        from promptkd.models.teachers import CachedTargets, EnsembleTargets, OnlineTargets
        from promptkd.stages.ensemble import EnsembleViews

        o, items, seed = self.opts, self.train_items, self.cfg.seed
        self.members = [(self.teacher, self.W, o.teacher_cache)] + [
            (t, _extra_classifier(cv, t, self.class_vectors, self.protocol).to(self.device), c)
            for t, cv, c in o.more_teachers]
        self.targets, parts, self.caches = [], [], []
        for t, w, c in self.members:
            t_tf = teacher_train_transform(t)
            opened = _open_cache(c, t, items, t_tf)
            self.caches.append(opened)
            t.eval()
            if opened is not None:  # stored in fp16: renormalised in CachedTargets
                self.targets.append(CachedTargets(w, t.logit_scale))
                parts.append(("cache", opened))
            else:
                same = _same_input(self.student_tf, t_tf)
                self.targets.append(OnlineTargets(t, w, None if same else t_tf.normalizer(self.device)))
                parts.append(("online", None if same else t_tf))
        self.cache = self.caches[0]
        self.target = None
        if len(self.members) > 1:
            self.dataset = EnsembleViews(items, self.student_tf, parts, seed)
            self.target = EnsembleTargets(self.targets, self.weights, o.ensemble, self.kd.temperature)
        elif self.cache is not None:  # the student renders the recorded crop with its own transform
            self.dataset = CachedViewDataset(items, self.student_tf, self.cache, seed)
        elif parts[0][1] is not None:
            self.dataset = PairedViews(items, self.student_tf, parts[0][1], seed)
        else:
            self.dataset = ImageDataset(items, self.student_tf, seed=seed, train=True)

    def _settings(self) -> dict:
        """What a resumed run must share with the run it continues (checked against the checkpoint)."""
        o = self.opts
        settings = {**self.kd.record(), "teacher": self.teacher.identity(),
                    "classnames": list(self.protocol.classnames),
                    "teacher_cache": self.cache.identity() if self.cache is not None else None,
                    "student": {"clip": self.student.clip.identity(), "prompts": self.student.prompt_config}}
        if o.more_teachers:  # absent for one teacher: its runs resume as before
            settings.update(teachers=[t.identity() for t, _, _ in self.members], ensemble=o.ensemble,
                            ensemble_weights=list(self.weights),
                            teacher_caches=[c.identity() if c is not None else None for c in self.caches])
        if o.projector_init != "random":
            settings["projector_init"] = o.projector_init
        return settings

    def prepare(self) -> None:
        """Before the first step: the resumed run's header, the baseline, the projector's start, class vectors."""
        import torch

        from promptkd.engine import distributed
        from promptkd.engine.checkpoint import read_header
        from promptkd.models.wrappers import ClassVectors

        o, cfg, ckpt = self.opts, self.cfg, self.run_folder.checkpoint
        resuming = o.resume and ckpt.is_file()
        # The one resume check (engine and distill settings); the loop then only loads the tensors.
        self.resume_header = read_header(ckpt, cfg, {"distill": self.settings}) if resuming else None
        history = list((self.resume_header or {}).get("history") or [])
        self.before = (self.resume_header or {}).get("baseline")
        if self.main and o.baseline and self.before is None and _labelled(self.protocol.test):
            with torch.random.fork_rng(devices=[]):  # a run with or without a baseline trains the same
                self.before = self._measure_baseline()
        if o.projector_init == "text":
            from promptkd.stages.projector_init import fit_projector_on_text, slow_down_projector

            if not resuming:  # a resumed run restores the projector from its checkpoint
                with torch.random.fork_rng(devices=[]):
                    fit_projector_on_text(self.student, self.teacher, self.W, self.protocol.classnames,
                                          self.train_items, device=self.device, seed=cfg.seed,
                                          batch_size=o.eval_batch_size, num_workers=cfg.num_workers)
            slow_down_projector(self.student)
        for (t, _, _), c in zip(self.members, self.caches):
            if c is not None and self.device.type != "cpu":  # its image tower never runs: free the device
                t.cpu()
        distributed.barrier()
        self.has_val = o.select_on_val and _labelled(self.protocol.val)
        self.best_val = (_best_epoch(history, "val") or {}).get("val", float("-inf"))
        self.file_meta = {"teacher": self.settings["teacher"], "classnames": list(self.protocol.classnames),
                          "dataset": self.protocol.dataset, "protocol": self.protocol.name, "kd": self.kd.record(),
                          **(o.meta or {})}
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cv = ClassVectors(self.classifier.cpu(), self.protocol.classnames, self.class_vectors.teacher)
            cv.save(self.run_folder.file(CLASS_VECTORS_FILE))

    def _measure_baseline(self) -> dict:
        o, cfg = self.opts, self.cfg
        before = measure_baseline(self.teacher, self.student, self.W, self.protocol, device=self.device,
                                  precision=cfg.precision, batch_size=o.eval_batch_size,
                                  num_workers=cfg.num_workers, progress=cfg.progress)
        if o.more_teachers:
            before.update(_ensemble_baseline(self.members, self.protocol, self.kd.temperature, self.weights,
                                             o.ensemble, o.eval_batch_size, cfg))
        return before

    # -- step -----------------------------------------------------------------------------------

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """The whole step's forward (the engine may compile it, cfg.compile): the KD loss of the
        student's logits against the teachers' targets for the same views."""
        import torch

        x_s = self.normalize_s(batch[0])  # uint8 from the loader -> normalised, on the device
        with torch.no_grad():
            if self.target is None:  # batch[1]: the teacher's view or cached feature (unused on a shared input)
                t_logits, log_p_t = self.targets[0].logits(batch[1], x_s), None
            else:
                log_p_t = self.target.log_probs(batch[1: 1 + len(self.members)], x_s)
        s_logits = class_logits(self.student(x_s), self.W, self.student.logit_scale)
        if log_p_t is None:
            loss = kd_loss(s_logits, t_logits, **self.kd.loss_args())
            agreement = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
        else:
            loss = kd_loss(s_logits, None, teacher_log_probs=log_p_t, **self.kd.loss_args())
            agreement = (s_logits.argmax(-1) == log_p_t.argmax(-1)).float().mean()
        return loss, {"agreement": agreement.detach()}

    # -- evaluate -------------------------------------------------------------------------------

    def evaluate(self, splits: dict[str, EvalSplit]) -> dict:
        from promptkd.metrics import evaluate_splits

        return evaluate_splits(self._encode, self.W, splits, self.student_test_tf, batch_size=self.opts.eval_batch_size,
                               device=self.device, num_workers=self.cfg.num_workers, progress=self.cfg.progress)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        from promptkd.engine.loop import autocast

        with autocast(self.device, self.cfg.precision):
            return self.student(x)

    def on_epoch_end(self, epoch: int) -> dict:
        """Val score (and the best-on-val student), and the test scores with official_best_on_test."""
        if not self.main:
            return {}
        record = {}
        if self.has_val:
            record["val"] = self.evaluate(self.protocol.val).get("val", float("nan"))
            if record["val"] > self.best_val:
                self.best_val = record["val"]
                self.student.save(self.run_folder.file(BEST_VAL_FILE), epoch=epoch + 1, selected_on="val", **self.file_meta)
        if self.opts.official_best_on_test:
            record.update({f"test_{k}": v for k, v in self.evaluate(self.protocol.test).items()})
        return record

    # -- save -----------------------------------------------------------------------------------

    def save_outputs(self, result: TrainResult) -> DistillResult:
        """The last-epoch student, its test scores (and the best-on-val student's), metrics.json."""
        from promptkd.engine import distributed

        student_path = self.run_folder.file(STUDENT_FILE)
        metrics: dict = {}
        if self.main:
            self.student.eval()
            self.student.save(student_path, epoch=self.cfg.epochs, selected_on="last", **self.file_meta)
            metrics = self._metrics(result, self._test_results(result))
            self.run_folder.write_metrics(metrics)
            _warn_if_below_baseline(metrics)
        distributed.barrier()
        return DistillResult(student_path, metrics, result)

    def _test_results(self, result: TrainResult) -> dict:
        if not _labelled(self.protocol.test):
            return {}
        epochs = self.cfg.epochs
        results = {"last": {"epoch": epochs, **self.evaluate(self.protocol.test)}}
        chosen = _best_epoch(result.history, "val") if self.has_val else None
        if chosen is not None:
            if chosen["epoch"] == epochs:
                scores = {k: v for k, v in results["last"].items() if k != "epoch"}
            else:
                last_state = _trainable(self.student)
                _load_trainable(self.student, load_artifact(self.run_folder.file(BEST_VAL_FILE), kind="student")[0],
                                BEST_VAL_FILE)
                scores = self.evaluate(self.protocol.test)
                _load_trainable(self.student, last_state, "last epoch")
            results["best_val"] = {"epoch": chosen["epoch"], "val": chosen["val"], **scores}
        if self.opts.official_best_on_test:
            results["official_best_on_test"] = _official_best(result.history, self.protocol.name)
        return results

    def _metrics(self, result: TrainResult, results: dict) -> dict:
        o, s = self.opts, self.settings
        return {
            "kind": "distill_metrics", "dataset": self.protocol.dataset, "protocol": self.protocol.name,
            "seed": self.cfg.seed, **self.kd.record(), "teacher": s["teacher"], "student": s["student"],
            "classes": len(self.protocol.classnames), "train_images": len(self.train_items),
            "teacher_cache": s["teacher_cache"], "results": results, "baseline": self.before,
            "history": result.history,
            **({k: s[k] for k in ("teachers", "ensemble", "ensemble_weights")} if o.more_teachers else {}),
            "projector_init": o.projector_init,
            "train": {"steps": result.steps, "skipped_steps": result.skipped_steps, "seconds": result.seconds,
                      "config": asdict(self.cfg)}, **(o.meta or {}),
        }


def _check_options(o: DistillOptions, kd: KDSettings) -> None:
    from promptkd.kd import ENSEMBLE_MODES

    if o.ensemble not in ENSEMBLE_MODES:
        raise PromptKDError(f"ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got {o.ensemble!r}")
    if o.projector_init not in PROJECTOR_INITS:
        raise PromptKDError(f"projector_init must be one of {', '.join(PROJECTOR_INITS)}, got {o.projector_init!r}")
    if kd.kd_reduction == "batchmean" and kd.kd_weight > 10:
        log.warning("kd_reduction=batchmean with kd weight %g: batchmean is C times the official loss, so the "
                    "official weights (1000/200) are far too large; the paper's formula is weight 1", kd.kd_weight)


def _ensemble_baseline(members, protocol: Protocol, temperature: float, weights, mode: str, batch_size: int,
                       cfg: TrainConfig) -> dict:
    """Each further teacher's scores on the test split, and the ensemble's (metrics.json "baseline"),
    from one pass of each teacher over the test images."""
    from promptkd.stages.ensemble import ensemble_scores

    combined, alone = ensemble_scores([t for t, _, _ in members], [w for _, w, _ in members], protocol,
                                      temperature=temperature, weights=weights, mode=mode, batch_size=batch_size,
                                      num_workers=cfg.num_workers, progress=cfg.progress)
    return {"more_teachers": alone[1:], "ensemble": combined}


def _extra_classifier(cv: ClassVectors, teacher: Teacher, first: ClassVectors, protocol: Protocol):
    """A further teacher's class vectors, checked against it and against the first teacher's names."""
    from promptkd.models.wrappers import check_same_teacher

    if cv.dim != teacher.dim:
        raise PromptKDError(f"class vectors have dim {cv.dim}, their teacher's embedding has dim {teacher.dim}")
    if cv.teacher:
        check_same_teacher(cv.teacher, teacher.identity(), "class vectors of a further teacher come from "
                           "another teacher", "vectors")
    if cv.classnames != first.classnames:
        raise PromptKDError("every teacher's class vectors must list the same class names in the same order "
                            f"(the first teacher's: {first.classnames[:3]}..., another: {cv.classnames[:3]}...)")
    return align_class_vectors(cv, protocol)


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
    more = base.get("more_teachers") or []
    rows = [("student zero-shot", base.get("student_zero_shot")), ("teacher 1" if more else "teacher", base.get("teacher")),
            *((f"teacher {i + 2}", r) for i, r in enumerate(more)),
            *([(f"teachers combined ({metrics.get('ensemble', 'mean')})", base.get("ensemble"))] if more else []),
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
    from promptkd.models.teachers import image_identity

    if cache is None:
        return None
    ident = image_identity(teacher.identity())  # a plain CLIP's templates do not change its image features
    if isinstance(cache, TeacherCache):
        cache.check(ident, items, teacher_tf)
        return cache
    cache = TeacherCache(cache, ident, items)
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


_TEACHER_MODEL_HELP, _TEACHER_WEIGHTS_HELP = model_option_help("teacher", default_note="default: what the artifact recorded")
_STUDENT_MODEL_HELP, _STUDENT_WEIGHTS_HELP = model_option_help("student", default_note="default ViT-B-16 / openai")


@dataclass
class DistillConfig:
    """Everything `promptkd distill` needs; YAML presets in configs/distill/ set these keys, and each
    setting with help is also an option of `promptkd distill` (settings.setting)."""

    dataset: str = setting("", metavar="NAME", help="benchmark name, or folder:PATH / images:PATH (unlabelled "
                                                    "images) / split:FILE.json")
    root: str | None = setting(None, help="data root holding the CoOp dataset folders")
    protocol: str = setting("base2novel", choices=PROTOCOLS,
                            help="base2novel, cross or dg (docs/datasets.md) (default: the preset's, else base2novel)")
    shots: int = setting(0, metavar="K", range=(">=", 0), help="K unlabelled images per class (0: all)")
    # empty with teacher_model: a plain CLIP teacher
    teacher: str = setting("", metavar="PATH|DIR", help="teacher file or run folder")
    # override the CLIP the teacher recorded (model name / config JSON), and its weights (when the recorded file moved)
    teacher_model: str | None = setting(None, metavar=MODEL_METAVAR, help=_TEACHER_MODEL_HELP)
    teacher_weights: str | None = setting(None, metavar=WEIGHTS_METAVAR, help=_TEACHER_WEIGHTS_HELP)
    # None: encode the class names once with the teacher before training
    class_vectors: str | None = setting(None, metavar="FILE", help="the teacher's stored class vectors")
    teacher_cache: str | None = setting(None, metavar="DIR", help="teacher features from `promptkd cache` (its image "
                                        "tower then never runs; alone, the cache's recorded teacher is used)")
    templates: str | None = setting(None, metavar=TEMPLATES_METAVAR, help=TEMPLATES_HELP)
    classes_file: str | None = setting(None, metavar="FILE", help="one class name per line (an unlabelled images: "
                                                                  "dataset without --class-vectors)")
    teachers: list = field(default_factory=list)  # further teachers: mappings of teacher_choice.TEACHER_KEYS
    ensemble: str = setting("mean", choices=ENSEMBLE_MODES, help="several teachers: mean of their probabilities "
                                                                 "(default) or confidence-weighted per image")
    ensemble_weights: list | None = setting(None, arg_type=weight_list, metavar="W1,W2,...",
                                            help="one weight per teacher, in order (default: equal)")
    projector_init: str = setting("random", choices=PROJECTOR_INITS,
                                  help="random (official, default) or text: fit the projector on paired student and "
                                       "teacher text features first (recommended with few unlabelled images)")
    student_model: str = setting("ViT-B-16", metavar=MODEL_METAVAR, help=_STUDENT_MODEL_HELP)
    # tag, local file, or none/null (random, seeded by train.seed)
    student_weights: str | None = setting("openai", metavar=WEIGHTS_METAVAR, help=_STUDENT_WEIGHTS_HELP)
    vision_depth: int = setting(9, range=(">=", 0), help=f"prompted blocks of the trained image tower {PRESET_DEFAULT}")
    n_ctx_vision: int = setting(4, range=(">=", 1), help=f"vision prompt tokens per block {PRESET_DEFAULT}")
    # The KD loss's settings (promptkd.kd.KDSettings reads the fields of its names).
    temperature: float = setting(1.0, range=(">", 0), help=f"KD softmax temperature, > 0 {PRESET_DEFAULT}")
    kd_weight: float | None = setting(None, range=(">=", 0), help="default: the official per-dataset weight on the 11 "
                                                                  "benchmarks, 1 per image elsewhere")
    kd_reduction: str = setting("official", choices=KD_REDUCTIONS, help="how the KD loss is averaged: official (over "
                                f"batch x classes) or batchmean {PRESET_DEFAULT}")
    kd_loss: str = setting("kl", choices=KD_LOSSES, help="kl: KL(teacher || student), the paper's (default); sym-kl: "
                                                         "KL(t || s) + KL(s || t), the symmetric KL of KDPL")
    # auto: bf16 (fp16 without bf16) on CUDA, fp32 elsewhere
    precision: str = setting("auto", choices=PRECISIONS, help="autocast dtype: auto (bf16 on CUDA, fp32 elsewhere), "
                                                              f"fp32, bf16, fp16; weights stay fp32 {PRESET_DEFAULT}")
    select_on_val: bool = setting(True, flag="--no-val",
                                  help="skip the per-epoch validation (and best-on-val selection)")
    official_best_on_test: bool = setting(False, help="also evaluate test every epoch and report the official "
                                                      "best-on-test number")
    eval_batch_size: int = setting(100, range=(">=", 1),
                                   help=f"images per forward in validation and test passes {PRESET_DEFAULT}")
    baseline: bool = setting(True, flag="--no-baseline", help="skip the student zero-shot and teacher passes over the "
                                                              "test split before training")
    train: TrainConfig = setting(default_factory=TrainConfig, options=(
        "epochs", "batch_size", "lr", "seed", "num_workers", "max_steps_per_epoch", "checkpoint_every", "on_nonfinite",
        "on_bad_image", "compile"))

    def __post_init__(self):
        self.train = {} if self.train is None else self.train  # `train:` with nothing under it
        if isinstance(self.train, dict):
            if "precision" in self.train:
                raise PromptKDError("set `precision` at the top level of a distill config, not under `train`")
            self.train = _from_dict(TrainConfig, self.train, "train")
        validate(self, "distill settings")
        if random_weights(self.student_weights):
            self.student_weights = None
        _check_teachers_settings(self)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        return _from_dict(cls, rename_keys(d, old_keys("distill"), "distill config"), "distill config")

    @classmethod
    def from_yaml(cls, *paths: str | Path, overrides: dict | None = None) -> DistillConfig:
        """Merge YAML presets left to right (the `train:` section key by key), then `overrides`."""
        return cls.from_dict(merge_settings(*(read_yaml(p) for p in paths), overrides or {}))


def _from_dict(cls, d: dict, what: str):
    check_known_keys(cls, d, what, "key")
    return cls(**d)


def _check_teachers_settings(cfg: DistillConfig) -> None:
    """What field metadata cannot say: each further teacher, and one weight per teacher."""
    from promptkd.kd import ensemble_weights
    from promptkd.stages.teacher_choice import TeacherChoice

    if not isinstance(cfg.teachers, list):
        raise PromptKDError("distill settings: teachers must be a list of teachers")
    for i, t in enumerate(cfg.teachers):
        TeacherChoice.from_dict(t, f"distill settings: teachers[{i}]")
    if cfg.ensemble_weights is not None:
        if not isinstance(cfg.ensemble_weights, list) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in cfg.ensemble_weights):
            raise PromptKDError("distill settings: ensemble_weights must be a list of numbers")
        ensemble_weights(1 + len(cfg.teachers), cfg.ensemble_weights)


def teacher_choices(cfg: DistillConfig):
    """The run's teachers: the first from the top-level settings, then `teachers`."""
    from promptkd.stages.teacher_choice import TeacherChoice

    first = TeacherChoice(cfg.teacher or None, cfg.teacher_model, cfg.teacher_weights, cfg.class_vectors,
                          cfg.teacher_cache, cfg.templates)
    return [first] + [TeacherChoice.from_dict(t, f"teachers[{i}]") for i, t in enumerate(cfg.teachers)]


@dataclass
class DistillPlan:
    """A distill config after its one check (`check_distill`); what runs from it trusts it: the
    teachers (each checked, its artifact resolved) and the device."""

    cfg: DistillConfig
    teachers: list  # stages.teacher_choice.TeacherChoice, checked: the first, then `teachers`
    device: torch.device


def check_distill(cfg: DistillConfig) -> DistillPlan:
    """Every check before heavy work, once: the dataset named, every teacher's files, class vectors,
    cache and templates, the classes file, the device and the student's CLIP files."""
    from promptkd.engine.loop import resolve_device
    from promptkd.inputs import check_clip_files
    from promptkd.stages.teacher_choice import check_teacher_choice

    if not cfg.dataset:
        raise PromptKDError("distill: no dataset (--dataset or `dataset:` in a config)")
    teachers = []
    for choice in teacher_choices(cfg):
        if choice.teacher_cache:
            require_cache_folder(choice.teacher_cache, "--teacher-cache")
        teachers.append(check_teacher_choice(choice))
    if cfg.classes_file and not Path(cfg.classes_file).is_file():
        raise PromptKDError(f"--classes-file {cfg.classes_file}: file not found")
    device = resolve_device(cfg.train.device)
    check_clip_files(cfg.student_model, cfg.student_weights, "student")
    return DistillPlan(cfg, teachers, device)


def distill(cfg: DistillConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Check the settings, then distil (run_distill); returns the student file."""
    return run_distill(check_distill(cfg), out_dir, resume).student_path


def run_distill(plan: DistillPlan, out_dir: str | Path | RunFolder, resume: bool = False) -> DistillResult:
    """Load teachers, class vectors and data, build the student, distil; returns the result (the
    student file, the metrics). The run folder (`out_dir`, or the RunFolder that claimed it) records
    the inputs in run.json before training and the outputs after.

    Under torchrun every process calls this; it joins the process group itself.
    """
    import torch

    from promptkd.engine import distributed
    from promptkd.engine.loop import resolve_precision
    from promptkd.models import load_clip
    from promptkd.models.wrappers import Student

    cfg, device = plan.cfg, plan.device
    run = out_dir if isinstance(out_dir, RunFolder) else RunFolder(Path(out_dir), "distill", DISTILL_ARTIFACTS)
    info = distributed.init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    train_cfg = TrainConfig(**{**asdict(cfg.train), "precision": resolve_precision(cfg.precision, device)})
    inputs = _load_inputs(plan, device, train_cfg.seed)
    kd_weight = _kd_weight(cfg, len(inputs.protocol.classnames))

    torch.manual_seed(train_cfg.seed)  # prompt and projector initialisation
    clip = load_clip(cfg.student_model, cfg.student_weights, init_seed=train_cfg.seed)
    student = Student(clip, inputs.teacher.dim, cfg.vision_depth, cfg.n_ctx_vision).to(device)
    if info.is_main:
        run.start(_run_inputs(plan, inputs, clip.source, train_cfg.seed))
    config = asdict(cfg)
    config.update(kd_weight=kd_weight, precision=train_cfg.precision, train=asdict(train_cfg))
    result = distill_models(
        inputs.teacher, student, inputs.class_vectors, inputs.protocol.train, run, protocol=inputs.protocol,
        train=train_cfg, kd=KDSettings.from_config(cfg, kd_weight=kd_weight), select_on_val=cfg.select_on_val,
        official_best_on_test=cfg.official_best_on_test, eval_batch_size=cfg.eval_batch_size, resume=resume,
        meta={"config": config}, teacher_cache=cfg.teacher_cache, baseline=cfg.baseline, more_teachers=inputs.more,
        ensemble=cfg.ensemble, ensemble_weights=cfg.ensemble_weights, projector_init=cfg.projector_init,
    )
    if info.is_main:
        run.finish()
    return result


@dataclass
class _Inputs:
    """What a distill run loads before its student: the teachers, class vectors and protocol."""

    teacher: Teacher
    records: list[dict]  # each teacher's run.json record
    class_vectors: ClassVectors
    protocol: Protocol
    more: list  # (teacher, class vectors, cache) of each further teacher


def _load_inputs(plan: DistillPlan, device, seed: int) -> _Inputs:
    """Each teacher, the class vectors (computed once when none are given, §6.1) and the protocol's splits."""
    from promptkd.models.wrappers import ClassVectors
    from promptkd.stages.teacher_choice import load_teacher_choice

    cfg, first = plan.cfg, plan.teachers[0]
    loaded = [load_teacher_choice(c, device=device, seed=seed, dataset=cfg.dataset) for c in plan.teachers]
    teacher = loaded[0][0]
    cv = ClassVectors.load(first.class_vectors, teacher=teacher, dim=teacher.dim) if first.class_vectors else None
    names = cv.classnames if cv is not None else _read_classes(cfg.classes_file)
    protocol = build_protocol(cfg.protocol, cfg.dataset, cfg.root, num_shots=cfg.shots, seed=seed,
                              reference_classnames=names)
    if not protocol.classnames:
        raise PromptKDError(f"{cfg.dataset}: no class names; give --classes-file FILE (or --class-vectors) for "
                            "unlabelled images")
    require_two_classes(protocol.classnames, cfg.dataset)
    if cv is None:  # pre-store once, after the teacher's prompts are loaded (§6.1)
        cv = compute_class_vectors(teacher, protocol.classnames)
    more = []
    for choice, (t, _) in zip(plan.teachers[1:], loaded[1:]):
        t_cv = ClassVectors.load(choice.class_vectors, teacher=t, dim=t.dim) if choice.class_vectors else \
            compute_class_vectors(t, protocol.classnames)
        more.append((t, t_cv, choice.teacher_cache))
    return _Inputs(teacher, [record for _, record in loaded], cv, protocol, more)


def _kd_weight(cfg: DistillConfig, n_classes: int) -> float:
    """The KD weight: as set, else the official one on the paper's datasets, else per image."""
    if cfg.kd_weight is not None:
        return cfg.kd_weight
    kd_weight = default_kd_weight(cfg.dataset, cfg.protocol, n_classes, cfg.kd_reduction)
    if not is_benchmark(cfg.dataset):
        log.info("kd weight %g: %g per image for a dataset outside the paper's (the official 1000 would be "
                 "%.3g per image with %d classes; --kd-weight sets another)", kd_weight, CUSTOM_KD_PER_IMAGE,
                 OFFICIAL_KD_WEIGHT / max(1, n_classes), n_classes)
    return kd_weight


def _run_inputs(plan: DistillPlan, inputs: _Inputs, student_clip: dict, seed: int) -> dict:
    """run.json's inputs: every teacher (file, class vectors, cache), the student's CLIP and the data."""
    from promptkd.runs import dataset_record, file_digest, file_record

    cfg = plan.cfg
    records = [{**record, "class_vectors": file_record(c.class_vectors) if c.class_vectors else None,
                "teacher_cache": {"path": str(Path(c.teacher_cache).resolve()),
                                  "manifest_sha256": file_digest(Path(c.teacher_cache) / "manifest.json")}
                if c.teacher_cache else None} for c, record in zip(plan.teachers, inputs.records)]
    return {**records[0], "student_clip": student_clip, **({"more_teachers": records[1:]} if inputs.more else {}),
            "dataset": dataset_record(inputs.protocol.dataset, cfg.root, inputs.protocol.train, protocol=cfg.protocol,
                                      shots=cfg.shots, seed=seed)}


def _read_classes(path: str | None) -> list[str] | None:
    if not path:
        return None
    from promptkd.data.folders import read_classnames

    return read_classnames(path)


# ----------------------------------------------------------------------------------------------
# `promptkd distill`

def config_from_args(args) -> DistillConfig:
    """YAML preset(s), then --set KEY=VALUE, then the explicit options (all from DistillConfig's fields,
    but --add-teacher)."""
    overrides = settings_from_args(DistillConfig, args)
    if args.add_teacher:
        from promptkd.stages.teacher_choice import parse_teacher_spec

        overrides["teachers"] = [parse_teacher_spec(t) for t in args.add_teacher]
    return DistillConfig.from_yaml(*args.config, overrides=overrides)


def _run(args) -> int:
    from promptkd.engine import distributed
    from promptkd.inputs import clip_inputs, dataset_inputs
    from promptkd.runs import check_apart
    from promptkd.stages.teacher_choice import teacher_inputs

    cfg = config_from_args(args)  # types and ranges of every setting
    plan = check_distill(cfg)  # every teacher (files, class vectors, cache, templates), the device, the student
    data, roots = dataset_inputs(cfg.dataset, cfg.root)
    teachers = {k: v for i, choice in enumerate(plan.teachers)  # the first teacher, then " 2", " 3", ...
                for k, v in teacher_inputs(choice, f" {i + 1}" if i else "").items()}
    check_apart(args.out, {**teachers, **data, **clip_inputs(cfg.student_model, cfg.student_weights, "student")},
                roots=roots)
    run = RunFolder.claim(args.out, "distill", DISTILL_ARTIFACTS, overwrite=args.overwrite, resume=args.resume,
                          finished=STUDENT_FILE)
    result = run_distill(plan, run.prepare(), resume=args.resume)
    if distributed.current().is_main:
        print(f"student: {result.student_path}")
        for name, r in result.metrics.get("results", {}).items():
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if isinstance(v, float))
            print(f"{name}: {shown}")
        table = baseline_table(result.metrics)
        if table:
            print(table)
    return 0


def register(sub) -> None:
    from promptkd.options import add_config_options, add_old_spellings, add_output_options
    from promptkd.stages.teacher_choice import TEACHER_KEYS

    p = sub.add_parser(
        "distill", help="distil a teacher into a small student on unlabelled images",
        description="Multi-GPU: torchrun --nproc_per_node N -m promptkd.cli distill ... "
                    "(the batch size is global and split across processes). The run folder (--out) records "
                    "what it was built from (run.json); eval and export take the folder alone.")
    add_config_options(p, several=True, example="configs/distill/vit_b16_c2_ep20_batch8_4ctx.yaml")
    add_output_options(p, "dir", resume=True, what="distillation run",
                       help="run folder (student, class vectors, checkpoint, metrics, run.json)")
    add_setting_options(p, DistillConfig)  # every setting with help: its option
    p.add_argument("--add-teacher", action="append", metavar="KEY=VALUE,...",
                   help="one more teacher (repeatable), e.g. teacher_model=ViT-L-14,teacher_weights=openai,"
                        "class_vectors=cv.safetensors; keys: " + ", ".join(TEACHER_KEYS))
    add_old_spellings(p, "distill")
    p.set_defaults(func=_run, resume_marker=CHECKPOINT_NAME)
