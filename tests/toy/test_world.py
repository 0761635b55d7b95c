"""The toy world: deterministic from its seed, enough classes, official base/novel split."""

import hashlib
import json
import math

import torch

from promptkd.toy.world import COLOUR_NAMES, SHAPES, World, vocabulary_words


def test_classes_and_base_novel_split():
    world = World(0)
    names = world.domain_classnames()
    assert len(names) >= 20
    assert len(set(names)) == len(names)
    assert names == sorted(names)  # folder order == label order
    assert world.n_base == math.ceil(len(names) / 2)
    # every class is a colour and a shape, words the pretraining captions use
    for name in names:
        colour, shape = name.split()
        assert colour in COLOUR_NAMES and shape in SHAPES


def test_pretrain_batch_is_deterministic_from_the_generator_seed():
    world = World(0)
    a_img, a_cap = world.pretrain_batch(16, torch.Generator().manual_seed(3))
    b_img, b_cap = world.pretrain_batch(16, torch.Generator().manual_seed(3))
    c_img, _ = world.pretrain_batch(16, torch.Generator().manual_seed(4))
    assert a_img.dtype == torch.uint8 and a_img.shape == (16, 3, 48, 48)
    assert torch.equal(a_img, b_img) and a_cap == b_cap
    assert not torch.equal(a_img, c_img)
    assert all(isinstance(c, str) and c for c in a_cap)


def _digests(images) -> list[str]:
    return [hashlib.sha256(im.contiguous().numpy().tobytes()).hexdigest() for im in images]


def test_domain_split_deterministic_and_disjoint():
    world = World(0)
    imgs, labels = world.domain_split("test", 2, seed=1)
    again, _ = World(0).domain_split("test", 2, seed=1)
    assert torch.equal(imgs, again)
    assert imgs.shape == (2 * world.n_classes, 3, 48, 48)
    assert labels.tolist() == [c for c in range(world.n_classes) for _ in range(2)]
    # No image is shared between the splits, the split seeds or the worlds, nor repeated inside one.
    seen = {}
    for name, (w, split, seed) in {"test": (0, "test", 1), "train": (0, "train", 1), "val": (0, "val", 1),
                                   "test, seed 2": (0, "test", 2), "world 1 test": (1, "test", 1)}.items():
        for digest in _digests(World(w).domain_split(split, 2, seed=seed)[0]):
            assert digest not in seen, f"an image of {name} is also in {seen.get(digest)}"
            seen[digest] = name
    assert len(seen) == 5 * 2 * world.n_classes


def test_caption_matches_marks_every_true_caption():
    world = World(0)
    _, captions, true_attrs, said = world.pretrain_batch(64, torch.Generator().manual_seed(0), return_attributes=True)
    m = World.caption_matches(true_attrs, said)
    assert m.diagonal().all()
    # a caption mentioning a different colour is never a match
    i, j = 0, next(k for k in range(64) if said[k, 0] >= 0 and said[k, 0] != true_attrs[0, 0])
    assert not m[i, j]


def test_vocabulary_covers_captions():
    import open_clip

    from promptkd.toy.models import world_token_ids

    tok = open_clip.SimpleTokenizer()
    ids = set(world_token_ids())
    _, captions = World(0).pretrain_batch(200, torch.Generator().manual_seed(0))
    for c in captions + [f"a photo of a {n}." for n in World(0).domain_classnames()]:
        assert set(tok.encode(c)) <= ids, c
    assert len(vocabulary_words()) > 50


def test_write_domain_coop_layout(tmp_path):
    world = World(0)
    root = world.write_domain(tmp_path / "toy", n_train=2, n_val=1, n_test=1, seed=0)
    split = json.loads((root / "split_zhou_Toy.json").read_text())
    assert set(split) == {"train", "val", "test"}
    assert len(split["train"]) == 2 * world.n_classes
    path, label, name = split["test"][-1]
    assert (root / "images" / path).is_file()
    assert world.domain_classnames()[label] == name
    from PIL import Image

    img = Image.open(root / "images" / path)
    assert img.size == (48, 48) and img.mode == "RGB"
    # the PNG holds exactly the generated pixels
    test_imgs, _ = world.domain_split("test", 1, seed=0)
    import numpy as np

    assert np.array_equal(np.asarray(img), test_imgs[-1].permute(1, 2, 0).numpy())


def test_domain_items_are_pil_images_with_labels():
    items = World(0).domain_items("val", 1)
    img, label = items[5]
    assert img.size == (48, 48) and img.mode == "RGB" and label == 5


def test_custom_domains_pick_distinct_classes_of_the_world_words():
    import pytest

    from promptkd.errors import PromptKDError
    from promptkd.toy.world import TEXTURES, custom_classnames

    for n in (5, 20, 64):
        names = custom_classnames(n)
        assert len(set(names)) == n and names == sorted(names) and all(len(c.split()) == 2 for c in names)
    many = custom_classnames(100)
    assert len(set(many)) == 100 and all(len(c.split()) == 3 and c.split()[1] in TEXTURES for c in many)
    assert custom_classnames(20) == custom_classnames(20) and custom_classnames(20, seed=1) != custom_classnames(20)
    with pytest.raises(PromptKDError, match="1 to 256"):
        custom_classnames(257)
    with pytest.raises(PromptKDError, match="blue fuzzy star"):
        World(0, classnames=["red circle", "blue fuzzy star"])


def test_a_custom_domain_draws_its_classes_and_keeps_the_demo_stream():
    from promptkd.toy.world import domain_classnames

    default, _ = World(0).domain_split("test", 2, seed=0)
    same, _ = World(0, classnames=list(reversed(domain_classnames()))).domain_split("test", 2, seed=0)
    assert torch.equal(default, same)  # labels follow alphabetical order, the stream is unchanged

    # a named texture is drawn: striped (period ~3-4.5 px) against plain, same colour and shape
    world = World(0, classnames=["red plain circle", "red striped circle"])
    images, labels = world.domain_split("test", 20, seed=0)
    assert world.n_base == 1 and labels.tolist() == [0] * 20 + [1] * 20
    centre = images[:, :, 20:28, 20:28].float()
    spread = centre.std(dim=(2, 3)).mean(1)  # within-shape pixel variation
    assert spread[20:].mean() > spread[:20].mean() + 10


def test_toy_domain_command_writes_a_dataset(tmp_path, capsys):
    from promptkd.cli import main
    from promptkd.data.protocols import build_protocol

    out = tmp_path / "five"
    assert main(["toy", "domain", "--out", str(out), "--n-classes", "5", "--n-train", "3", "--n-val", "1",
                 "--n-test", "2"]) == 0
    protocol = build_protocol("base2novel", f"split:{out / 'split_zhou_Toy.json'}", str(out / "images"))
    assert len(protocol.classnames) == 5 and len(protocol.train) == 15
    assert len(protocol.test["base"].items) == 3 * 2 and len(protocol.test["novel"].items) == 2 * 2
    assert main(["toy", "domain", "--out", str(out), "--n-classes", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
