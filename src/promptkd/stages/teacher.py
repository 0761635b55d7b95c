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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from promptkd.artifacts import load_artifact, write_json
from promptkd.data.dataset import ImageDataset
from promptkd.data.transforms import transforms_for
from promptkd.engine import TrainConfig, distributed, train_loop
from promptkd.engine.loop import CHECKPOINT_NAME, resolve_device
from promptkd.errors import PromptKDError
from promptkd.metrics import DEFAULT_TEMPLATES, accuracy, encode_items, zero_shot_class_vectors
from promptkd.models.loading import ClipBundle, load_clip
from promptkd.models.wrappers import Teacher
from promptkd.settings import check_field_types, check_known_keys, read_yaml
from promptkd.stages.templates import IMAGENET_TEMPLATES

log = logging.getLogger(__name__)

TEACHER_NAME = "teacher.safetensors"
MODES = ("promptsrc", "ce")
LOSS_TERMS = ("ce", "text_l1", "image_l1", "logits_kl")

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = ("model", "pretrained", "dataset", "root", "shots", "seed", "vision_depth", "text_depth",
                "n_ctx_vision", "n_ctx_text", "ctx_init", "mode", "text_loss_weight", "image_loss_weight",
                "logits_loss_weight", "gpa", "gpa_mean", "gpa_std")


@dataclass
class TeacherConfig:
    """Everything a teacher run needs; the defaults are the official PromptSRC ViT-L/14 preset."""

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    dataset: str | None = None  # a benchmark name, or folder:PATH / split:FILE.json (see build_dataset)
    root: str | None = None
    shots: int = 16
    seed: int = 1  # few-shot draw, prompt initialisation and batch order
    vision_depth: int = 9
    text_depth: int = 9
    n_ctx_vision: int = 4
    n_ctx_text: int = 4
    ctx_init: str | None = "a photo of a"
    mode: str = "promptsrc"  # promptsrc | ce (CE only: IVLP / CoOp)
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    logits_loss_weight: float = 1.0  # the official code adds the KL term unweighted
    gpa: bool | None = None  # None: on for promptsrc, off for ce (the official IVLP trainer has none)
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    text_chunk: int | None = None  # classes per checkpointed text chunk (None: all at once, as official)
    val_every: int = 0  # also validate every N epochs (0: only the final prompts)
    zero_shot: bool = True  # also report plain CLIP's zero-shot val accuracy
    eval_batch_size: int = 100
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = _train_config(self.train)
        check_field_types(self, "teacher settings")
        if self.mode not in MODES:
            raise PromptKDError(f"teacher mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gpa is None:
            self.gpa = self.mode == "promptsrc"
        if self.gpa and self.gpa_std <= 0:
            raise PromptKDError(f"gpa_std must be > 0, got {self.gpa_std}")
        if self.text_chunk is not None and self.text_chunk < 1:
            raise PromptKDError(f"text_chunk must be >= 1, got {self.text_chunk}")
        if self.shots < 0:
            raise PromptKDError(f"shots must be >= 0 (0: all images), got {self.shots}")
        self.train.seed = self.seed

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TeacherConfig:
        if not isinstance(d, dict):
            raise PromptKDError(f"{source}: expected a mapping of teacher settings")
        check_known_keys(cls, d, source, "teacher setting")
        d = dict(d)
        if "train" in d:
            d["train"] = _train_config(d["train"], source)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TeacherConfig:
        return cls.from_dict(read_yaml(path), str(path))

    def to_dict(self) -> dict:
        return asdict(self)


def _train_config(d: dict | TrainConfig, source: str = "config") -> TrainConfig:
    if isinstance(d, TrainConfig):
        return d
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
    logs = torch.tensor([-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)], dtype=torch.float64)
    return torch.softmax(logs, dim=0).tolist()


class PromptAggregate:
    """GPA: the running Gaussian-weighted sum of the prompt tensors at each epoch's end.

    A `Stateful` for train_loop, so the sum is checkpointed and a resumed run aggregates the same.
    """

    def __init__(self, teacher: Teacher, weights: list[float]):
        self.teacher, self.weights = teacher, list(weights)
        self.sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in teacher.prompt_tensors().items()}

    @torch.no_grad()
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
        self.sum = {k: v.to(self.sum[k].device, torch.float32).clone() for k, v in tensors.items()}

    def write_into(self, teacher: Teacher) -> None:
        teacher.load_prompt_tensors(self.sum, "prompt aggregate")


class TeacherObjective:
    """The per-batch teacher loss for train_loop: PromptSRC's four terms, or CE alone.

    Frozen references come from the same CLIP without prompts: text features averaged over the
    60 ImageNet templates (once, here) and image features of each batch (no grad).
    """

    def __init__(self, teacher: Teacher, classnames: list[str], cfg: TeacherConfig):
        self.teacher, self.cfg = teacher, cfg
        device = teacher.logit_scale.device
        self.tokens = teacher.text.tokenize_classnames(classnames).to(device)
        self.text_reference = None
        if cfg.mode == "promptsrc":
            log.info("frozen text reference: %d classes x %d templates", len(classnames), len(IMAGENET_TEMPLATES))
            self.text_reference = zero_shot_class_vectors(teacher.clip, classnames, IMAGENET_TEMPLATES, device)

    def terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term as it enters the total (weights applied)."""
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
    return Teacher(clip, cfg.vision_depth, cfg.text_depth, cfg.n_ctx_vision, cfg.n_ctx_text, cfg.ctx_init)


@torch.no_grad()
def teacher_accuracy(teacher: Teacher, items, classnames: list[str], transform, *, text_chunk: int | None = 256,
                     batch_size: int = 100, progress: bool = False) -> float:
    """Top-1 accuracy (%) of the prompted teacher on `items` over `classnames`."""
    was_training = teacher.training
    teacher.eval()
    device = teacher.logit_scale.device
    vectors = teacher.encode_classnames(classnames, text_chunk)
    feats, labels = encode_items(teacher.image, items, transform, batch_size=batch_size, device=device,
                                 desc="teacher val", progress=progress)
    teacher.train(was_training)
    return accuracy(feats, labels, vectors.float().cpu())


@torch.no_grad()
def zero_shot_eval(clip: ClipBundle, items, classnames: list[str], transform, templates=DEFAULT_TEMPLATES, *,
                   batch_size: int = 100, device: str | torch.device = "cpu", progress: bool = False) -> float:
    """Top-1 accuracy (%) of plain CLIP with template-averaged class names (the zero-shot baseline)."""
    vectors = zero_shot_class_vectors(clip, classnames, templates, device)
    feats, labels = encode_items(clip.model.encode_image, items, transform, batch_size=batch_size, device=device,
                                 desc="zero-shot val", progress=progress)
    return accuracy(feats, labels, vectors.cpu())


def loss_curves(history: list[dict]) -> dict[str, list[float]]:
    """Per-epoch means of the total loss and of each term that was logged."""
    keys = [k for k in ("loss", *LOSS_TERMS) if any(k in r for r in history)]
    return {k: [r.get(k) for r in history] for k in keys}


def _check_resume(out_dir: Path, cfg: TeacherConfig, classnames: list[str]) -> None:
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        return  # train_loop reports the missing checkpoint
    _, meta = load_artifact(path, kind="checkpoint")
    saved = meta.get("teacher_config") or {}
    for key in _RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise PromptKDError(f"{path}: cannot resume: the checkpoint was written with {key}={saved[key]!r}, "
                                f"this run has {key}={getattr(cfg, key)!r}")
    if meta.get("classnames") not in (None, classnames):
        raise PromptKDError(f"{path}: cannot resume: the checkpoint was trained on other classes")


def train_teacher_on(teacher: Teacher, train_items, val_items, classnames: list[str], cfg: TeacherConfig,
                     out_dir: str | Path, *, resume: bool = False, meta: dict | None = None) -> Path:
    """Train `teacher`'s prompts on labelled items (labels index `classnames`); returns the artifact path.

    Writes out_dir/teacher.safetensors (prompts + metadata: val and zero-shot accuracy, loss
    curves, settings), out_dir/metrics.json, and the engine's checkpoint and metrics.jsonl.
    """
    out_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    distributed.init_distributed(device.type)
    teacher.clip.model.to(device)  # parts of CLIP the teacher does not own (the zero-shot path uses them)
    teacher.to(device)
    # Chunking only saves memory when each chunk is recomputed in backward.
    teacher.text.grad_checkpointing = bool(cfg.text_chunk)
    train_tf, test_tf = transforms_for(teacher.clip.preprocess_cfg)
    dataset = ImageDataset(list(train_items), train_tf, seed=cfg.seed, train=True)
    val_items = list(val_items or [])
    if resume:
        _check_resume(out_dir, cfg, classnames)
    objective = TeacherObjective(teacher, classnames, cfg)
    gpa = None
    if cfg.gpa:
        weights = gpa_weights(cfg.train.epochs, cfg.gpa_mean, cfg.gpa_std)
        if not 1 <= cfg.gpa_mean <= cfg.train.epochs:
            log.warning("GPA mean %s is outside epochs 1..%d: the aggregate is mostly epoch %d",
                        cfg.gpa_mean, cfg.train.epochs, max(range(len(weights)), key=weights.__getitem__) + 1)
        gpa = PromptAggregate(teacher, weights)
    main = distributed.current().is_main
    eval_kw = {"text_chunk": cfg.text_chunk or 256, "batch_size": cfg.eval_batch_size, "progress": cfg.train.progress}

    def on_epoch_end(epoch: int) -> dict:
        record = {}
        if gpa is not None:
            record["gpa_weight"] = gpa.add(epoch)
        if main and cfg.val_every and val_items and (epoch + 1) % cfg.val_every == 0:
            record["val_acc"] = teacher_accuracy(teacher, val_items, classnames, test_tf, **eval_kw)
        return record

    result = train_loop(teacher, objective, dataset, cfg.train, out_dir, resume=resume, on_epoch_end=on_epoch_end,
                        extra_state=[gpa] if gpa is not None else [], desc="teacher",
                        checkpoint_meta={"teacher_config": cfg.to_dict(), "classnames": list(classnames)})
    if gpa is not None:
        gpa.write_into(teacher)
    path = out_dir / TEACHER_NAME
    if not main:
        return path
    teacher.eval()
    val_acc = teacher_accuracy(teacher, val_items, classnames, test_tf, **eval_kw) if val_items else None
    zs_acc = None
    if cfg.zero_shot and val_items:
        zs_acc = zero_shot_eval(teacher.clip, val_items, classnames, test_tf, batch_size=cfg.eval_batch_size,
                                device=device, progress=cfg.train.progress)
    if not val_items:
        log.info("no validation images (e.g. ImageNet has no val split): no val accuracy reported")
    curves = loss_curves(result.history)
    summary = {
        "val_acc": val_acc,
        "zero_shot_val_acc": zs_acc,
        "n_train": len(dataset),
        "n_val": len(val_items),
        "classnames": list(classnames),
        "loss_curves": curves,
        "gpa_weights": gpa.weights if gpa is not None else None,
        "seconds": result.seconds,
    }
    teacher.save(path, **(meta or {}), **summary, config=cfg.to_dict())
    write_json(out_dir / "metrics.json", {**summary, "history": result.history})
    log.info("teacher written to %s (val acc %s, zero-shot %s)", path, _pct(val_acc), _pct(zs_acc))
    return path


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}%"


def train_teacher(cfg: TeacherConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Build the dataset's teacher split and the prompted CLIP, then train (see train_teacher_on)."""
    from promptkd.data.protocols import teacher_split
    from promptkd.data.registry import build_dataset
    from promptkd.data.sampling import set_random_seed

    if not cfg.dataset:
        raise PromptKDError("no dataset: pass --dataset NAME (or folder:PATH) or set 'dataset' in the config")
    ds = build_dataset(cfg.dataset, cfg.root)
    split = teacher_split(ds, cfg.shots, cfg.seed)
    if not split.train:
        raise PromptKDError(f"{cfg.dataset}: no training images for the base classes")
    set_random_seed(cfg.seed)  # prompt initialisation depends on the seed alone
    if cfg.pretrained is None:
        log.warning("training a teacher on randomly initialised CLIP weights (only useful for tests)")
    clip = load_clip(cfg.model, cfg.pretrained, device=resolve_device(cfg.train.device))
    teacher = build_teacher(clip, cfg)
    log.info("teacher: %s/%s, %d base classes, %d train and %d val images", cfg.model, cfg.pretrained,
             len(split.classnames), len(split.train), len(split.val or []))
    return train_teacher_on(teacher, split.train, split.val, split.classnames, cfg, out_dir, resume=resume,
                            meta={"dataset": ds.name, "shots": cfg.shots, "seed": cfg.seed})


# ---------------------------------------------------------------------------------------------- CLI

# flag -> (TeacherConfig field, or "train.<field>")
_FLAGS = {
    "model": "model", "pretrained": "pretrained", "dataset": "dataset", "root": "root", "shots": "shots",
    "seed": "seed", "mode": "mode", "text_chunk": "text_chunk", "vision_depth": "vision_depth",
    "text_depth": "text_depth", "n_ctx_vision": "n_ctx_vision", "n_ctx_text": "n_ctx_text",
    "gpa_mean": "gpa_mean", "gpa_std": "gpa_std", "val_every": "val_every",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "precision": "train.precision",
    "device": "train.device", "num_workers": "train.num_workers", "max_steps_per_epoch": "train.max_steps_per_epoch",
    "checkpoint_every": "train.checkpoint_every", "on_nonfinite": "train.on_nonfinite", "on_bad_image": "train.on_bad_image",
}


def config_from_args(args) -> TeacherConfig:
    """YAML preset (or the ViT-L/14 defaults), then --set KEY=VALUE, then the explicit flags."""
    import yaml

    data = read_yaml(args.config) if args.config else {}
    data = {**data, "train": dict(data.get("train") or {})}
    overrides = []
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PromptKDError(f"--set {item!r}: expected KEY=VALUE (e.g. train.lr=0.01)")
        overrides.append((key.strip(), yaml.safe_load(value)))
    for dest, key in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append((key, value))
    if args.no_gpa:
        overrides.append(("gpa", False))
    for key, value in overrides:
        section, _, name = key.rpartition(".")
        if section not in ("", "train"):
            raise PromptKDError(f"unknown setting {key!r} (use NAME or train.NAME)")
        (data["train"] if section else data)[name] = value
    return TeacherConfig.from_dict(data, args.config or "settings")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "teacher", help="train a teacher's prompts (PromptSRC) on K-shot base-class images",
        description="Train IVLP deep prompts on a CLIP teacher with the PromptSRC losses and GPA (or CE only). "
                    "Defaults are the official ViT-L/14 preset; --config YAML overrides them, flags override that.")
    p.add_argument("--config", help="YAML preset, e.g. configs/teacher/vit_l14.yaml")
    p.add_argument("--out", required=True, help="output folder (teacher.safetensors, metrics.json, checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--dataset", help="benchmark name (ImageNet, OxfordPets, ...) or folder:PATH / split:FILE.json")
    p.add_argument("--root", help="data root holding the datasets")
    p.add_argument("--model", help="open_clip model name or config JSON (default ViT-L-14)")
    p.add_argument("--pretrained", help="weights tag or local checkpoint (default openai)")
    p.add_argument("--shots", type=int, help="labelled images per base class (default 16)")
    p.add_argument("--seed", type=int, help="few-shot draw, prompt init and batch order (default 1)")
    p.add_argument("--mode", choices=MODES, help="promptsrc (default) or ce (CE only: IVLP/CoOp)")
    p.add_argument("--text-chunk", type=int, help="classes per gradient-checkpointed text chunk (saves memory)")
    p.add_argument("--vision-depth", type=int)
    p.add_argument("--text-depth", type=int)
    p.add_argument("--n-ctx-vision", type=int)
    p.add_argument("--n-ctx-text", type=int)
    p.add_argument("--gpa-mean", type=float)
    p.add_argument("--gpa-std", type=float)
    p.add_argument("--no-gpa", action="store_true", help="keep the last epoch's prompts")
    p.add_argument("--val-every", type=int, help="also validate every N epochs")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every N steps (for --resume)")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), help="NaN/inf loss or gradients: stop (default) or skip the batch")
    p.add_argument("--on-bad-image", choices=("substitute", "error"),
                   help="unreadable training image: use the next readable one (default, counted) or stop")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other setting, e.g. --set image_loss_weight=5 --set train.grad_clip=1.0")
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = config_from_args(args)
    path = train_teacher(cfg, args.out, resume=args.resume)
    print(path)
    return 0
