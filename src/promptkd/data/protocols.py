"""The paper's evaluation protocols as plain item lists + class names.

Where the official code selects models on test data (base test split as "val", test as val in
cross-dataset), these protocols give a real validation split instead (official-promptkd.md §6.2);
an empty val (ImageNet, which has none) means "no model selection: take the last epoch".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from promptkd.errors import PromptKDError

if TYPE_CHECKING:  # the data modules import torch; this one is read by the CLI's parser
    from promptkd.data.dataset import DatasetSplits, Item


@dataclass
class TeacherSplit:
    train: list[Item]  # K shots per base class, labels 0..m-1
    val: list[Item]  # min(K, 4) shots per base class of the split's val
    classnames: list[str]  # the m base classes


@dataclass
class Base2Novel:
    train: list[Item]  # full train split, all classes (labels kept, unused by distillation)
    val_base: list[Item]  # split val, base classes, labels 0..m-1: for model selection
    test_base: list[Item]  # labels 0..m-1
    test_novel: list[Item]  # labels 0..n-m-1
    classnames: list[str]  # all n classes; base = classnames[:n_base]
    n_base: int

    @property
    def base_classnames(self) -> list[str]:
        return self.classnames[: self.n_base]

    @property
    def novel_classnames(self) -> list[str]:
        return self.classnames[self.n_base :]


@dataclass
class CrossDataset:
    train: list[Item]  # target train split, used without labels
    val: list[Item]
    test: list[Item]
    classnames: list[str]


@dataclass
class DomainGeneralisation:
    test: list[Item]  # labels index the variant's own classes
    classnames: list[str]  # the variant's classes
    class_indices: list[int]  # classnames[i] is ImageNet class class_indices[i]


def _names(ds: DatasetSplits, labels: list[int]) -> list[str]:
    return [ds.classnames[y] for y in labels]


def teacher_split(ds: DatasetSplits, num_shots: int = 16, seed: int = 1) -> TeacherSplit:
    """Few-shot first (as official, over all classes, so the draws match), then keep base classes."""
    from promptkd.data.sampling import fewshot_for_seed, split_labels, subsample_classes

    train, val = fewshot_for_seed(ds.train, ds.val, num_shots, seed)
    base = split_labels(train, "base")
    train, val = subsample_classes(train, val, subsample="base")
    return TeacherSplit(train, val, _names(ds, base))


def base2novel(ds: DatasetSplits, num_shots: int = 0, seed: int = 1) -> Base2Novel:
    """Transductive base-to-novel (official PromptKD). num_shots >= 1 first draws K shots per class
    of train (and min(K, 4) of val) as the paper's ImageNet ablation did; 0 uses everything."""
    from promptkd.data.sampling import fewshot_for_seed, split_labels, subsample_classes

    train, val = fewshot_for_seed(ds.train, ds.val, num_shots, seed)
    all_labels = split_labels(train, "all")
    if all_labels != list(range(len(ds.classnames))):
        raise PromptKDError(f"{ds.name}: train split lacks some classes, base/novel would be shifted")
    _, val_base, test_base = subsample_classes(train, val, ds.test, subsample="base")
    _, test_novel = subsample_classes(train, ds.test, subsample="novel")
    n_base = len(split_labels(train, "base"))
    return Base2Novel(list(train), val_base, test_base, test_novel, list(ds.classnames), n_base)


def cross_dataset(ds: DatasetSplits) -> CrossDataset:
    """Target dataset for a teacher trained elsewhere (ImageNet): all classes, train used unlabelled."""
    return CrossDataset(list(ds.train), list(ds.val), list(ds.test), list(ds.classnames))


def domain_generalisation(variant_ds: DatasetSplits, imagenet_classnames) -> DomainGeneralisation:
    """Evaluate an ImageNet variant over the classes it defines.

    `imagenet_classnames` is the ImageNet DatasetSplits (matched by wnid) or its list of class
    names (matched by name). Evaluation must score over ImageNet class vectors sliced by
    `class_indices`: ImageNet-A/R have 200 classes, and the official code (§6.9) compared their
    labels 0..199 against the wrong class vectors when run in base2novel mode.
    """
    from promptkd.data.dataset import DatasetSplits

    if isinstance(imagenet_classnames, DatasetSplits):
        ref, mine, what = imagenet_classnames.class_ids, variant_ds.class_ids, "wnid"
        if ref is None or mine is None:
            raise PromptKDError(f"{variant_ds.name}: class ids (wnids) are needed to match ImageNet classes")
    else:
        ref, mine, what = list(imagenet_classnames), variant_ds.classnames, "class name"
        dupes = {c for c, k in Counter(ref).items() if k > 1} & set(mine)
        if dupes:
            raise PromptKDError(f"ImageNet class names {sorted(dupes)[:3]} are ambiguous; pass the ImageNet dataset")
    index = {c: i for i, c in enumerate(ref)}
    missing = [c for c in mine if c not in index]
    if missing:
        raise PromptKDError(f"{variant_ds.name}: {what}(s) {missing[:3]} not among the ImageNet classes")
    return DomainGeneralisation(list(variant_ds.test), list(variant_ds.classnames), [index[c] for c in mine])


# ----------------------------------------------------------------------------------------------
# Protocols: which images train, which select, which test, and which class vectors score them.

PROTOCOLS = ("base2novel", "cross", "dg")


@dataclass
class EvalSplit:
    """Labelled images scored against rows `classes` of the protocol's classifier (None: all)."""

    items: list[Item]
    classes: slice | None = None


@dataclass
class Protocol:
    """A dataset under one of the paper's protocols, as item lists and class names.

    `classnames` are the classes the classifier must list, in order. `class_indices` (DG only)
    picks those classes' rows out of class vectors made for the full ImageNet class list.
    """

    name: str
    dataset: str
    classnames: list[str]
    train: list[Item]
    val: dict[str, EvalSplit] = field(default_factory=dict)
    test: dict[str, EvalSplit] = field(default_factory=dict)
    class_indices: list[int] | None = None


def build_protocol(name: str, dataset: str, root=None, *, num_shots: int = 0, seed: int = 1,
                   reference_classnames: Sequence[str] | None = None) -> Protocol:
    """Build `dataset` under protocol `name`.

    - base2novel: train on all train images (all classes, unlabelled); select on the split's val
      of the base classes; test base (m-way over W[:m]) and novel ((n-m)-way over W[m:]) apart.
    - cross: train on the target's train images (unlabelled), select on its val, test on all classes.
    - dg: the official DG runs are transductive: train (unlabelled) and test on the variant's
      images; no val. With `reference_classnames` (ImageNet's), classes are mapped into that list.
    `reference_classnames` also names the classes of an unlabelled `images:` dataset.
    """
    from promptkd.data.registry import build_dataset  # registry reads folders and split files

    if name not in PROTOCOLS:
        raise PromptKDError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    ds = build_dataset(dataset, root)
    if name == "base2novel":
        if not ds.classnames:
            raise PromptKDError(f"{dataset}: base2novel needs a labelled dataset (class names and labels); "
                                "distil unlabelled images with --protocol cross")
        b = base2novel(ds, num_shots=num_shots, seed=seed)
        m = slice(0, b.n_base)
        return Protocol(name, ds.name, b.classnames, b.train, {"val": EvalSplit(b.val_base, m)},
                        {"base": EvalSplit(b.test_base, m), "novel": EvalSplit(b.test_novel, slice(b.n_base, None))})
    classnames = list(ds.classnames) or list(reference_classnames or [])
    if name == "cross":
        c = cross_dataset(ds)
        val = {"val": EvalSplit(c.val)} if c.val else {}
        return Protocol(name, ds.name, classnames, c.train, val, {"accuracy": EvalSplit(c.test)})
    indices = None
    if reference_classnames is not None and ds.classnames and list(reference_classnames) != list(ds.classnames):
        indices = domain_generalisation(ds, list(reference_classnames)).class_indices
    test = list(ds.test) or list(ds.train)
    return Protocol(name, ds.name, classnames, test, {}, {"accuracy": EvalSplit(test)}, indices)


def align_class_vectors(cv, protocol: Protocol, source: str = "class vectors"):
    """The rows of `cv` (a ClassVectors) for the protocol's classes, in order; a mismatch says what differs."""
    if protocol.class_indices is not None:
        return cv.vectors[protocol.class_indices]
    cv.check_classnames(protocol.classnames, source)
    return cv.vectors
