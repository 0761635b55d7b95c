import random

import pytest

from promptkd.data import (
    DatasetSplits,
    Item,
    base2novel,
    build_dataset,
    cross_dataset,
    domain_generalisation,
    generate_fewshot,
    subsample_classes,
    teacher_split,
)
from promptkd.errors import PromptKDError


def toy(n_classes=5, per_class=(6, 3, 2)):
    def items(split, k):
        return [Item(f"/{split}/{y}_{i}.jpg", y) for i in range(k) for y in range(n_classes)]

    names = [f"class {c}" for c in "abcdefgh"[:n_classes]]
    return DatasetSplits("toy", names, items("train", per_class[0]), items("val", per_class[1]),
                         items("test", per_class[2]))


def test_teacher_split_follows_official_order():
    ds = toy()
    split = teacher_split(ds, num_shots=4, seed=2)
    random.seed(2)  # official: seed, few-shot train then val (all classes), then keep base classes
    train, val = generate_fewshot(ds.train, 4), generate_fewshot(ds.val, 4)
    exp_train, exp_val = subsample_classes(train, val, subsample="base")
    assert split.train == exp_train and split.val == exp_val
    assert split.classnames == ["class a", "class b", "class c"]
    assert len(split.train) == 3 * 4 and len(split.val) == 3 * 3  # val has only 3 per class here
    assert {it.label for it in split.train} == {0, 1, 2}


def test_base2novel_is_transductive_with_a_real_val_split():
    ds = toy()
    p = base2novel(ds)
    assert p.train == ds.train  # all classes, full train split
    assert p.n_base == 3 and p.base_classnames == ["class a", "class b", "class c"]
    assert p.novel_classnames == ["class d", "class e"]
    assert all(it.path.startswith("/val/") for it in p.val_base)  # model selection never sees test
    assert {it.label for it in p.val_base} == {0, 1, 2}
    assert {it.label for it in p.test_base} == {0, 1, 2} and len(p.test_base) == 6
    assert {it.label for it in p.test_novel} == {0, 1} and len(p.test_novel) == 4
    assert p.test_novel[0] == Item("/test/3_0.jpg", 0)


def test_base2novel_with_shots():
    p = base2novel(toy(), num_shots=2, seed=1)
    assert len(p.train) == 5 * 2 and len(p.val_base) == 3 * 2


def test_base2novel_refuses_missing_train_classes():
    ds = toy()
    ds.train = [it for it in ds.train if it.label != 1]
    with pytest.raises(PromptKDError, match="train split lacks some classes"):
        base2novel(ds)


def test_cross_dataset():
    ds = toy()
    p = cross_dataset(ds)
    assert (p.train, p.val, p.test, p.classnames) == (ds.train, ds.val, ds.test, ds.classnames)


def test_domain_generalisation_maps_variant_classes_to_imagenet(imagenet_root, imagenet_a_root):
    imagenet = build_dataset("ImageNet", imagenet_root)
    variant = build_dataset("ImageNetA", imagenet_a_root)
    dg = domain_generalisation(variant, imagenet)
    assert dg.classnames == ["goldfish", "hammerhead shark"]
    assert dg.class_indices == [1, 4]  # rows of the 5 ImageNet class vectors to score against
    assert [it.label for it in dg.test] == [0, 0, 1, 1]
    assert domain_generalisation(variant, imagenet.classnames).class_indices == [1, 4]


def test_domain_generalisation_errors():
    variant = DatasetSplits("v", ["crane", "cat"], [], [], [Item("/x.jpg", 0)], ["n2", "n3"])
    with pytest.raises(PromptKDError, match="ambiguous"):
        domain_generalisation(variant, ["crane", "dog", "crane", "cat"])
    with pytest.raises(PromptKDError, match=r"not among the ImageNet classes"):
        domain_generalisation(variant, ["dog", "cat"])
    imagenet = DatasetSplits("ImageNet", ["crane", "cat"], [], [], [], ["n1", "n3"])
    with pytest.raises(PromptKDError, match=r"wnid\(s\) \['n2'\]"):
        domain_generalisation(variant, imagenet)
