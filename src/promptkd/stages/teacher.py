"""Stage I: train a teacher's prompts on K labelled shots of the base classes.

PromptSRC (official-promptkd.md §1): IVLP deep prompts on both CLIP towers, trained with
cross-entropy plus three self-regularising terms that keep the prompted model close to the frozen
CLIP, then Gaussian prompt aggregation (GPA) over the epochs. `mode='ce'` is plain IVLP/CoOp-style
prompt tuning with cross-entropy only.

Differences from the official code, on purpose:
- GPA averages the prompt tensors only. The official code re-sums the whole state dict, frozen
  fp16 CLIP weights included, so its "frozen" weights drift by fp16 rounding (§1.2, §6.12).
- Validation accuracy is measured on the split's few-shot *val* set, never on test (§6.2).
- `text_chunk` runs the per-step text forward over the classes in chunks with gradient
  checkpointing, so a 1000-class ViT-L/14 teacher fits on 16-24 GB GPUs (docs/teacher.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from promptkd.engine.config import CHECKPOINT_NAME, TrainConfig
from promptkd.errors import PromptKDError
from promptkd.options import (
    MODEL_METAVAR,
    PRECISIONS,
    PRESET_DEFAULT,
    WEIGHTS_METAVAR,
    model_option_help,
    old_keys,
    positive_float,
)
from promptkd.runs import RunFolder, run_outputs
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
from promptkd.stages.templates import IMAGENET_TEMPLATES

if TYPE_CHECKING:  # torch and the models are imported where they run: `promptkd teacher --help` stays fast
    import torch

    from promptkd.engine.checkpoint import TrainResult
    from promptkd.models.loading import ClipBundle
    from promptkd.models.wrappers import Teacher

log = logging.getLogger(__name__)

TEACHER_NAME = "teacher.safetensors"
# The artifact a teacher run writes (RunFolder.file); with the engine's files and the run's own, all it
# writes into its folder (an --overwrite removes these first).
TEACHER_ARTIFACTS = (TEACHER_NAME,)
TEACHER_OUTPUTS = run_outputs(*TEACHER_ARTIFACTS)
MODES = ("promptsrc", "ce")
LOSS_TERMS = ("ce", "text_l1", "image_l1", "logits_kl")

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("model", "weights", "dataset", "root", "shots", "seed", "vision_depth", "text_depth",
                "n_ctx_vision", "n_ctx_text", "ctx_init", "mode", "text_loss_weight", "image_loss_weight",
                "logits_loss_weight", "gpa", "gpa_mean", "gpa_std")


_MODEL_HELP, _WEIGHTS_HELP = model_option_help("teacher", default_note="default ViT-L-14 / openai")


@dataclass
class TeacherConfig:
    """Everything a teacher run needs; the defaults are the official PromptSRC ViT-L/14 preset. Each
    setting with help is also an option of `promptkd teacher` (settings.setting)."""

    model: str = setting("ViT-L-14", flag="--teacher-model", metavar=MODEL_METAVAR, help=_MODEL_HELP)
    # open_clip tag, local checkpoint, or none/null (random, seeded by `seed`)
    weights: str | None = setting("openai", flag="--teacher-weights", metavar=WEIGHTS_METAVAR, help=_WEIGHTS_HELP)
    # a benchmark name, or folder:PATH / split:FILE.json (see build_dataset)
    dataset: str | None = setting(None, metavar="NAME", help="benchmark name (ImageNet, OxfordPets, ...) or "
                                                              "folder:PATH / split:FILE.json")
    root: str | None = setting(None, help="data root holding the datasets")
    shots: int = setting(16, metavar="K", range=(">=", 0), help="labelled images per base class (default 16)")
    seed: int = setting(1, help="few-shot draw, prompt init, batch order, random weights (default 1)")
    vision_depth: int = setting(9, range=(">=", 0), help=f"prompted blocks of the trained image tower {PRESET_DEFAULT}")
    text_depth: int = setting(9, range=(">=", 0), help=f"prompted blocks of the teacher's text tower {PRESET_DEFAULT}")
    n_ctx_vision: int = setting(4, range=(">=", 1), help=f"vision prompt tokens per block {PRESET_DEFAULT}")
    n_ctx_text: int = setting(4, range=(">=", 1), help=f"text prompt tokens per block {PRESET_DEFAULT}")
    ctx_init: str | None = "a photo of a"
    mode: str = setting("promptsrc", choices=MODES, help="promptsrc (default) or ce (CE only: IVLP/CoOp)")
    text_loss_weight: float = setting(25.0, flag=False, range=(">=", 0))
    image_loss_weight: float = setting(10.0, flag=False, range=(">=", 0))
    # the official code adds the KL term unweighted
    logits_loss_weight: float = setting(1.0, flag=False, range=(">=", 0))
    # None: on for promptsrc, off for ce (the official IVLP trainer has none)
    gpa: bool | None = setting(None, flag="--no-gpa", help="keep the last epoch's prompts")
    gpa_mean: float = setting(15.0, help=f"Gaussian prompt aggregation: the epoch of largest weight {PRESET_DEFAULT}")
    # > 0 only when gpa is on (checked in __post_init__); the option always wants > 0
    gpa_std: float = setting(1.0, arg_type=positive_float,
                             help=f"Gaussian prompt aggregation: the spread in epochs {PRESET_DEFAULT}")
    text_chunk: int | None = setting(None, metavar="N", range=(">=", 1),  # None: all at once, as official
                                     help="classes per gradient-checkpointed text forward (saves memory)")
    val_every: int = setting(0, metavar="N", range=(">=", 0), help="also validate every N epochs")  # 0: final only
    zero_shot: bool = True  # also report plain CLIP's zero-shot val accuracy
    eval_batch_size: int = setting(100, flag=False, range=(">=", 1))
    # autocast dtype; auto: bf16 (fp16 without bf16) on CUDA, fp32 elsewhere (as distill)
    precision: str = setting("fp32", choices=PRECISIONS, help="autocast dtype (default fp32; auto: bf16 on CUDA)")
    train: TrainConfig = setting(default_factory=TrainConfig, options=(
        "epochs", "batch_size", "lr", "num_workers", "max_steps_per_epoch", "checkpoint_every", "on_nonfinite",
        "on_bad_image"))

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = _train_config(self.train)
        validate(self, "teacher settings")
        if self.gpa is None:
            self.gpa = self.mode == "promptsrc"
        if self.gpa and self.gpa_std <= 0:
            raise PromptKDError(f"teacher settings: gpa_std must be > 0, got {self.gpa_std}")
        if random_weights(self.weights):
            self.weights = None
        self.train.seed = self.seed

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TeacherConfig:
        if not isinstance(d, dict):
            raise PromptKDError(f"{source}: expected a mapping of teacher settings")
        d = rename_keys(d, old_keys("teacher"), source)
        check_known_keys(cls, d, source, "teacher setting")
        if "train" in d:
            d["train"] = _train_config(d["train"], source)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: dict | None = None) -> TeacherConfig:
        """The YAML preset (None: the defaults), then `overrides` (the `train:` section key by key)."""
        return cls.from_dict(merge_settings(read_yaml(path) if path else {}, overrides or {}), str(path or "settings"))

    def to_dict(self) -> dict:
        return asdict(self)


def _train_config(d: dict | TrainConfig, source: str = "config") -> TrainConfig:
    if isinstance(d, TrainConfig):
        return d
    d = {} if d is None else d  # `train:` with nothing under it
    if not isinstance(d, dict):
        raise PromptKDError(f"{source}: 'train' must be a mapping")
    check_known_keys(TrainConfig, d, source, "train setting")
    if "seed" in d:
        raise PromptKDError(f"{source}: set the teacher's top-level 'seed', not train.seed")
    return TrainConfig(**d)


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Normalised N(e; mean, std) for epochs e = 1..epochs (official get_gauss).

    Normalised in log space, so a mean far beyond the last epoch still gives finite weights.
    """
    import torch

    logs = torch.tensor([-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)], dtype=torch.float64)
    return torch.softmax(logs, dim=0).tolist()


class PromptAggregate:
    """GPA: the running Gaussian-weighted sum of the prompt tensors at each epoch's end.

    A `Stateful` for train_loop, so the sum is checkpointed and a resumed run aggregates the same.
    """

    def __init__(self, teacher: Teacher, weights: list[float]):
        import torch

        self.teacher, self.weights = teacher, list(weights)
        self.sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in teacher.prompt_tensors().items()}

    def add(self, epoch: int) -> float:
        w = self.weights[epoch]
        for k, v in self.teacher.prompt_tensors().items():
            self.sum[k] += w * v.detach().float()
        return w

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.sum)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.sum):
            raise PromptKDError("checkpoint's prompt aggregate does not match this teacher's prompts")
        self.sum = {k: v.to(self.sum[k].device, self.sum[k].dtype).clone() for k, v in tensors.items()}

    def write_into(self, teacher: Teacher) -> None:
        teacher.load_prompt_tensors(self.sum, "prompt aggregate")


class TeacherObjective:
    """The per-batch teacher loss for train_loop: PromptSRC's four terms, or CE alone.

    Frozen references come from the same CLIP without prompts: text features averaged over the
    60 ImageNet templates (once, here) and image features of each batch (no grad).
    """

    def __init__(self, teacher: Teacher, classnames: list[str], cfg: TeacherConfig):
        from promptkd.models.teachers import template_class_vectors

        self.teacher, self.cfg = teacher, cfg
        device = teacher.logit_scale.device
        self.tokens = teacher.text.tokenize_classnames(classnames).to(device)
        from promptkd.stages.class_vectors import warn_cut_names

        warn_cut_names(self.tokens, classnames)
        self.text_reference = None
        if cfg.mode == "promptsrc":
            log.info("frozen text reference: %d classes x %d templates", len(classnames), len(IMAGENET_TEMPLATES))
            self.text_reference = template_class_vectors(lambda tokens: teacher.clip.model.encode_text(tokens.to(device)),
                                                          teacher.clip.tokenizer, classnames, IMAGENET_TEMPLATES,
                                                          normalize_each=False)  # PromptSRC's: raw features averaged

    def terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term as it enters the total (weights applied)."""
        import torch
        import torch.nn.functional as F

        t = self.teacher
        text = F.normalize(t.text.encode(self.tokens, self.cfg.text_chunk).float(), dim=-1)
        image = F.normalize(t.image(images).float(), dim=-1)
        logits = t.logit_scale * image @ text.T
        out = {"ce": F.cross_entropy(logits, labels)}
        if self.cfg.mode == "ce":
            return out
        with torch.no_grad():
            image_ref = F.normalize(t.image.visual(images).float(), dim=-1)
            zs_logits = t.logit_scale * image_ref @ self.text_reference.T
        out["text_l1"] = self.cfg.text_loss_weight * F.l1_loss(text, self.text_reference)
        out["image_l1"] = self.cfg.image_loss_weight * F.l1_loss(image, image_ref)
        # KL(p_zs || p), summed and divided by B*C as the official code does.
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zs_logits, -1), reduction="sum", log_target=True)
        out["logits_kl"] = self.cfg.logits_loss_weight * kl / logits.numel()
        return out

    def __call__(self, batch) -> tuple[torch.Tensor, dict]:
        images, labels = batch[0], batch[1]
        terms = self.terms(images, labels)
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}


def build_teacher(clip: ClipBundle, cfg: TeacherConfig) -> Teacher:
    from promptkd.models.wrappers import Teacher

    return Teacher(clip, cfg.vision_depth, cfg.text_depth, cfg.n_ctx_vision, cfg.n_ctx_text, cfg.ctx_init)


def teacher_accuracy(teacher: Teacher, items, classnames: list[str], transform, *, text_chunk: int | None = 256,
                     batch_size: int = 100, progress: bool = False) -> float:
    """Top-1 accuracy (%) of the prompted teacher on `items` over `classnames`."""
    import torch

    from promptkd.metrics import accuracy, encode_items

    was_training = teacher.training
    teacher.eval()
    device = teacher.logit_scale.device
    with torch.no_grad():
        vectors = teacher.encode_classnames(classnames, text_chunk)
    feats, labels = encode_items(teacher.image, items, transform, batch_size=batch_size, device=device,
                                 desc="teacher val", progress=progress)
    teacher.train(was_training)
    return accuracy(feats, labels, vectors.float().cpu())


def loss_curves(history: list[dict]) -> dict[str, list[float]]:
    """Per-epoch means of the total loss and of each term that was logged."""
    keys = [k for k in ("loss", *LOSS_TERMS) if any(k in r for r in history)]
    return {k: [r.get(k) for r in history] for k in keys}


def _resume_settings(cfg: TeacherConfig, classnames: list[str]) -> dict:
    """What a resumed teacher run must share with its checkpoint, by header key (engine.checkpoint.read_header)."""
    return {"teacher_config": {key: getattr(cfg, key) for key in _RESUME_KEYS}, None: {"classnames": list(classnames)}}


@dataclass
class TeacherResult:
    """What a teacher run returns: the artifact, the metrics (metrics.json's content; {} off the main
    process) and the engine's record of the training."""

    path: Path
    metrics: dict
    train: TrainResult


class TeacherRecipe:
    """One teacher run in named phases, as DistillRecipe: `setup` (device, views), `prepare` (the one
    resume check, the loss: TeacherObjective, GPA), `on_epoch_end` (GPA sum, val), `save_outputs`
    (teacher.safetensors, metrics.json). The engine owns the loop, the RunFolder the folder."""

    def __init__(self, teacher: Teacher, train_items, val_items, classnames: list[str], cfg: TeacherConfig,
                 out_dir: str | Path | RunFolder, *, resume: bool = False, meta: dict | None = None,
                 device: torch.device | None = None, resume_header: dict | None = None):
        self.teacher, self.train_items, self.val_items = teacher, list(train_items), list(val_items or [])
        self.classnames, self.cfg, self.resume, self.meta = list(classnames), cfg, resume, meta
        self.run_folder = out_dir if isinstance(out_dir, RunFolder) else RunFolder(Path(out_dir), "teacher",
                                                                                   TEACHER_ARTIFACTS)
        self.device, self.resume_header = device, resume_header

    def run(self) -> TeacherResult:
        from promptkd.engine.loop import train_loop

        self.setup()
        self.prepare()
        result = train_loop(self.teacher, self.objective, self.dataset, self.train_cfg, self.run_folder.path,
                            resume=self.resume, resume_header=self.resume_header, on_epoch_end=self.on_epoch_end,
                            extra_state=[self.gpa] if self.gpa is not None else [], desc="teacher",
                            checkpoint_meta={"teacher_config": self.cfg.to_dict(), "classnames": self.classnames})
        return self.save_outputs(result)

    def setup(self) -> None:
        """The device (resolved once), the precision, the teacher on it, the training views."""
        from promptkd.data.dataset import ImageDataset
        from promptkd.data.transforms import transforms_for
        from promptkd.engine import distributed
        from promptkd.engine.loop import resolve_device

        cfg = self.cfg
        self.device = self.device or resolve_device(cfg.train.device)
        distributed.init_distributed(self.device.type)
        self.train_cfg = _train_settings(cfg, self.device)
        self.teacher.clip.model.to(self.device)  # parts of CLIP the teacher does not own (the zero-shot path uses them)
        self.teacher.to(self.device)
        # Chunking only saves memory when each chunk is recomputed in backward.
        self.teacher.text.grad_checkpointing = bool(cfg.text_chunk)
        train_tf, self.test_tf = transforms_for(self.teacher.clip.preprocess_cfg)
        self.dataset = ImageDataset(self.train_items, train_tf, seed=cfg.seed, train=True)
        self.main = distributed.current().is_main
        self.eval_kw = {"text_chunk": cfg.text_chunk or 256, "batch_size": cfg.eval_batch_size,
                        "progress": cfg.train.progress}

    def prepare(self) -> None:
        """The one resume check (engine and teacher settings, from the header), the loss and GPA."""
        from promptkd.engine.checkpoint import read_header

        cfg, ckpt = self.cfg, self.run_folder.checkpoint
        if self.resume and self.resume_header is None and ckpt.is_file():  # a missing one: train_loop says so
            self.resume_header = read_header(ckpt, self.train_cfg, _resume_settings(cfg, self.classnames))
        self.objective = TeacherObjective(self.teacher, self.classnames, cfg)
        self.gpa = None
        if cfg.gpa:
            weights = gpa_weights(cfg.train.epochs, cfg.gpa_mean, cfg.gpa_std)
            if not 1 <= cfg.gpa_mean <= cfg.train.epochs:
                log.warning("GPA mean %s is outside epochs 1..%d: the aggregate is mostly epoch %d",
                            cfg.gpa_mean, cfg.train.epochs, max(range(len(weights)), key=weights.__getitem__) + 1)
            self.gpa = PromptAggregate(self.teacher, weights)

    def on_epoch_end(self, epoch: int) -> dict:
        """The epoch's prompts into the GPA sum; the val accuracy every `val_every` epochs."""
        cfg, record = self.cfg, {}
        if self.gpa is not None:
            record["gpa_weight"] = self.gpa.add(epoch)
        if self.main and cfg.val_every and self.val_items and (epoch + 1) % cfg.val_every == 0:
            record["val_acc"] = teacher_accuracy(self.teacher, self.val_items, self.classnames, self.test_tf,
                                                 **self.eval_kw)
        return record

    def save_outputs(self, result: TrainResult) -> TeacherResult:
        """The aggregated prompts, their val and zero-shot accuracy: teacher.safetensors and metrics.json."""
        cfg, teacher, val_items = self.cfg, self.teacher, self.val_items
        if self.gpa is not None:
            self.gpa.write_into(teacher)
        path = self.run_folder.file(TEACHER_NAME)
        if not self.main:
            return TeacherResult(path, {}, result)
        teacher.eval()
        val_acc = teacher_accuracy(teacher, val_items, self.classnames, self.test_tf, **self.eval_kw) \
            if val_items else None
        zs_acc = None
        if cfg.zero_shot and val_items:
            from promptkd.data.protocols import EvalSplit
            from promptkd.metrics import zero_shot_scores

            zs_acc = zero_shot_scores(teacher.clip, self.classnames, {"val": EvalSplit(val_items)},
                                      batch_size=cfg.eval_batch_size, device=self.device,
                                      progress=cfg.train.progress)["val"]
        if not val_items:
            log.info("no validation images (e.g. ImageNet has no val split): no val accuracy reported")
        summary = {"val_acc": val_acc, "zero_shot_val_acc": zs_acc, "n_train": len(self.dataset),
                   "n_val": len(val_items), "classnames": self.classnames, "loss_curves": loss_curves(result.history),
                   "gpa_weights": self.gpa.weights if self.gpa is not None else None, "seconds": result.seconds}
        teacher.save(path, **(self.meta or {}), **summary,
                     config={**cfg.to_dict(), "precision": self.train_cfg.precision, "train": asdict(self.train_cfg)})
        metrics = {**summary, "history": result.history}
        self.run_folder.write_metrics(metrics)
        log.info("teacher written to %s (val acc %s, zero-shot %s)", path, _pct(val_acc), _pct(zs_acc))
        return TeacherResult(path, metrics, result)


def _train_settings(cfg: TeacherConfig, device: torch.device) -> TrainConfig:
    """The engine's settings: `train`, with the top-level precision resolved for the device (auto)."""
    from promptkd.engine.loop import resolve_precision

    return replace(cfg.train, precision=resolve_precision(cfg.precision, device))


def train_teacher_on(teacher: Teacher, train_items, val_items, classnames: list[str], cfg: TeacherConfig,
                     out_dir: str | Path | RunFolder, *, resume: bool = False, meta: dict | None = None,
                     device: torch.device | None = None, resume_header: dict | None = None) -> Path:
    """Train `teacher`'s prompts on labelled items (labels index `classnames`); returns the artifact path.

    Writes out_dir/teacher.safetensors (prompts + metadata: val and zero-shot accuracy, loss
    curves, settings), out_dir/metrics.json, and the engine's checkpoint and metrics.jsonl
    (TeacherRecipe; its `run()` returns the metrics too). `device`: resolved by the caller (None: here).
    """
    return TeacherRecipe(teacher, train_items, val_items, classnames, cfg, out_dir, resume=resume, meta=meta,
                         device=device, resume_header=resume_header).run().path


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}%"


def check_teacher(cfg: TeacherConfig) -> torch.device:
    """Every check of a teacher run before heavy work, once: the device, a labelled dataset named,
    the CLIP's files. Returns the device."""
    from promptkd.engine.loop import resolve_device
    from promptkd.inputs import check_clip_files

    device = resolve_device(cfg.train.device)
    if not cfg.dataset:
        raise PromptKDError("no dataset: pass --dataset NAME (or folder:PATH) or set 'dataset' in the config")
    _check_labelled(cfg.dataset)
    check_clip_files(cfg.model, cfg.weights, "teacher")
    return device


def train_teacher(cfg: TeacherConfig, out_dir: str | Path | RunFolder, resume: bool = False, *,
                  device: torch.device | None = None) -> Path:
    """Build the dataset's teacher split and the prompted CLIP, then train (TeacherRecipe); returns the
    artifact. `device`: what check_teacher returned (the CLI checks before claiming the folder); None:
    the settings are checked here."""
    from promptkd.data.protocols import teacher_split
    from promptkd.data.registry import build_dataset
    from promptkd.data.sampling import set_random_seed
    from promptkd.engine.checkpoint import read_header
    from promptkd.models.loading import load_clip
    from promptkd.runs import dataset_record

    device = device or check_teacher(cfg)
    run = out_dir if isinstance(out_dir, RunFolder) else RunFolder(Path(out_dir), "teacher", TEACHER_ARTIFACTS)
    ds = build_dataset(cfg.dataset, cfg.root)
    split = teacher_split(ds, cfg.shots, cfg.seed)
    if not split.train:
        raise PromptKDError(f"{cfg.dataset}: no training images for the base classes")
    require_two_classes(split.classnames, cfg.dataset, "base classes")
    header = None
    if resume and run.checkpoint.is_file():  # the one resume check, before the CLIP is loaded
        header = read_header(run.checkpoint, _train_settings(cfg, device), _resume_settings(cfg, split.classnames))
    set_random_seed(cfg.seed)  # prompt initialisation depends on the seed alone
    clip = load_clip(cfg.model, cfg.weights, device=device, init_seed=cfg.seed)
    teacher = build_teacher(clip, cfg)
    log.info("teacher: %s/%s, %d base classes, %d train and %d val images", cfg.model, cfg.weights,
             len(split.classnames), len(split.train), len(split.val or []))
    run.start({"teacher_clip": clip.source, "dataset": dataset_record(ds.name, cfg.root, split.train, shots=cfg.shots,
                                                                       seed=cfg.seed)})
    path = train_teacher_on(teacher, split.train, split.val, split.classnames, cfg, run, resume=resume,
                            meta={"dataset": ds.name, "shots": cfg.shots, "seed": cfg.seed}, device=device,
                            resume_header=header)
    run.finish()
    return path


# ---------------------------------------------------------------------------------------------- CLI

def config_from_args(args) -> TeacherConfig:
    """YAML preset (or the ViT-L/14 defaults), then --set KEY=VALUE, then the explicit options (all
    from TeacherConfig's fields)."""
    return TeacherConfig.from_yaml(args.config, overrides=settings_from_args(TeacherConfig, args))


def register(subparsers) -> None:
    from promptkd.options import add_config_options, add_old_spellings, add_output_options

    p = subparsers.add_parser(
        "teacher", help="train a teacher's prompts (PromptSRC) on K-shot base-class images",
        description="Train IVLP deep prompts on a CLIP teacher with the PromptSRC losses and GPA (or CE only). "
                    "Defaults are the official ViT-L/14 preset; --config YAML overrides them, --set and the "
                    "options override that. The run folder (--out) records what it was built from (run.json).")
    add_config_options(p, example="configs/teacher/vit_l14.yaml")
    add_output_options(p, "dir", resume=True, what="teacher run",
                       help="run folder (teacher.safetensors, metrics.json, checkpoint, run.json)")
    add_setting_options(p, TeacherConfig)  # every setting with help: its option
    add_old_spellings(p, "teacher")
    p.set_defaults(func=_run, resume_marker=CHECKPOINT_NAME)


def _check_labelled(dataset: str) -> None:
    """A teacher learns from labels: an unlabelled images: folder is one line naming the way without."""
    if dataset.startswith("images:"):
        raise PromptKDError(f"--dataset {dataset}: a PromptSRC teacher trains on labelled shots, and images: "
                            "folders have no labels; use a plain CLIP as the teacher instead (distill "
                            "--teacher-model M --teacher-weights W, docs/distill.md) or give folder:PATH with one "
                            "sub-folder per class")


def _run(args) -> int:
    from promptkd.inputs import clip_inputs, dataset_inputs
    from promptkd.runs import check_apart

    cfg = config_from_args(args)  # types and ranges of every setting
    device = check_teacher(cfg)  # the device exists here, a labelled dataset, the CLIP's files
    data, roots = dataset_inputs(cfg.dataset, cfg.root)
    check_apart(args.out, {**data, **clip_inputs(cfg.model, cfg.weights, "teacher")}, roots=roots)
    run = RunFolder.claim(args.out, "teacher", TEACHER_ARTIFACTS, overwrite=args.overwrite, resume=args.resume,
                          finished=TEACHER_NAME)
    path = train_teacher(cfg, run.prepare(), resume=args.resume, device=device)
    print(path)
    return 0
