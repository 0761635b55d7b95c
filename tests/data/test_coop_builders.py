import contextlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from promptkd.data import build_dataset, canonical_name, dataset_names
from promptkd.errors import PromptKDError


def _files(root):
    return sorted(str(p) for p in root.rglob("*"))


def test_oxford_pets_reads_json_split(pets_root):
    before = _files(pets_root)
    ds = build_dataset("OxfordPets", pets_root)
    assert ds.name == "OxfordPets"
    assert ds.classnames == ["abyssinian", "american bulldog", "bengal"]  # underscores -> spaces
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 6)
    first = ds.train[0]
    assert os.path.isabs(first.path) and first.path.endswith("oxford_pets/images/abyssinian_train_0.jpg")
    assert [it.label for it in ds.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert _files(pets_root) == before  # nothing cached or written into the dataset folder


@pytest.mark.parametrize("name", ["oxford_pets", "OXFORDPETS", "oxford-pets", "pets"])
def test_names_are_case_and_separator_insensitive(name):
    assert canonical_name(name) == "OxfordPets"


def test_aliases():
    assert canonical_name("dtd") == "DescribableTextures"
    assert canonical_name("flowers102") == "OxfordFlowers"
    assert canonical_name("imagenet_sketch") == "ImageNetSketch"
    assert len(dataset_names()) == 15


def test_unknown_name_lists_known_ones():
    with pytest.raises(PromptKDError, match="unknown dataset 'cifar10'.*OxfordPets.*ImageNetR"):
        build_dataset("cifar10", ".")


def test_caltech_keeps_processed_json_names(caltech_root):
    ds = build_dataset("caltech101", caltech_root)
    assert ds.classnames == ["accordion", "airplane", "face", "leopard"]
    assert ds.train[0].path.endswith("caltech-101/101_ObjectCategories/accordion/train_0.jpg")


def test_dtd(dtd_root):
    ds = build_dataset("dtd", dtd_root)
    assert ds.name == "DescribableTextures"
    assert ds.classnames == ["banded", "blotchy", "braided"]
    assert len(ds.test) == 6


def test_stanford_cars_paths_are_relative_to_dataset_folder(data_root, make_json_dataset):
    make_json_dataset(data_root, "stanford_cars", "", "StanfordCars", ["2012 Audi TT", "2007 BMW X5"],
                       rel=lambda c, s, i: f"cars_{'test' if s == 'test' else 'train'}/{s}{c[:4]}{i}.jpg")
    ds = build_dataset("StanfordCars", data_root)
    assert ds.train[0].path.endswith("stanford_cars/cars_train/train20120.jpg")


def test_root_may_be_the_dataset_folder_itself(pets_root):
    ds = build_dataset("OxfordPets", pets_root / "oxford_pets")
    assert len(ds.train) == 9


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
                 "os.symlink", "os.link", "os.chown"}
_read_only: list[str] = []  # folders a test has made read-only for this process (see read_only)
_hooks: list = []


def _refuse_writes(event, args):
    if not _read_only or (event != "open" and event not in _WRITE_EVENTS):
        return
    if event == "open" and not (isinstance(args[2], int) and args[2] & _WRITE_FLAGS):
        return
    paths = [a for a in (args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1])
             if isinstance(a, (str, bytes, os.PathLike))]
    for p in paths:
        p = os.path.abspath(os.fsdecode(p))
        if any(p == d or p.startswith(d + os.sep) for d in _read_only):
            raise PermissionError(13, "Permission denied (read-only folder, simulated by the test)", p)


@contextlib.contextmanager
def read_only(folder):
    """The folder and everything in it refuse to be written by this process, root included (an audit
    hook: chmod does not stop root, and CI often runs as root); on other users chmod is applied too."""
    if _refuse_writes not in _hooks:
        sys.addaudithook(_refuse_writes)  # cannot be removed; inert while _read_only is empty
        _hooks.append(_refuse_writes)
    folder = os.path.abspath(folder)
    modes = {}
    if os.geteuid() != 0:
        for d in [folder, *(str(p) for p in Path(folder).rglob("*") if p.is_dir())]:
            modes[d] = os.stat(d).st_mode
            os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    _read_only.append(folder)
    try:
        yield
    finally:
        _read_only.remove(folder)
        for d, mode in modes.items():
            os.chmod(d, mode)


def _tree(root):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")])


def test_read_only_dataset_root(pets_root):
    before = _tree(pets_root)
    with read_only(pets_root):
        with pytest.raises(PermissionError):  # the simulation holds for this user, root or not
            (pets_root / "oxford_pets" / "probe.json").write_text("{}")
        assert len(build_dataset("OxfordPets", pets_root).test) == 6
    assert _tree(pets_root) == before  # nothing written, renamed or touched
    (pets_root / "oxford_pets" / "probe.json").write_text("{}")  # and writable again afterwards


def test_missing_split_file_names_expected_path(data_root):
    (data_root / "oxford_pets" / "images").mkdir(parents=True)
    with pytest.raises(PromptKDError, match="oxford_pets/split_zhou_OxfordPets.json: not found"):
        build_dataset("OxfordPets", data_root)


def test_missing_images_are_one_error_with_count(pets_root):
    images = pets_root / "oxford_pets" / "images"
    for name in ("bengal_test_0.jpg", "bengal_test_1.jpg", "abyssinian_train_2.jpg"):
        (images / name).unlink()
    with pytest.raises(PromptKDError, match=r"3 of 18 listed images are missing, e\.g\. .*abyssinian_train_2"):
        build_dataset("OxfordPets", pets_root)


@pytest.mark.parametrize("bad", ["../../outside.jpg", "/etc/passwd", "a/../../x.jpg"])
def test_split_path_escaping_the_root_is_refused(pets_root, bad):
    split_path = pets_root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(split_path.read_text())
    split["test"][0][0] = bad
    split_path.write_text(json.dumps(split))
    with pytest.raises(PromptKDError, match="points outside the image folder"):
        build_dataset("OxfordPets", pets_root)


def test_split_label_gaps_are_refused(pets_root):
    split_path = pets_root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(split_path.read_text())
    for key in split:
        split[key] = [[p, 5 if y == 2 else y, c] for p, y, c in split[key]]
    split_path.write_text(json.dumps(split))
    with pytest.raises(PromptKDError, match=r"labels must be 0\.\.5"):
        build_dataset("OxfordPets", pets_root)


def test_fgvc_aircraft_txt_format(aircraft_root):
    ds = build_dataset("fgvc_aircraft", aircraft_root)
    assert ds.classnames == ["707-320", "A300B4", "F/A-18"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 6)
    assert ds.train[0].path.endswith("fgvc_aircraft/images/0000001.jpg")
    assert [it.label for it in ds.test] == [0, 0, 1, 1, 2, 2]


def test_fgvc_aircraft_unknown_variant(aircraft_root):
    path = aircraft_root / "fgvc_aircraft" / "images_variant_val.txt"
    path.write_text(path.read_text() + "0000001 Spitfire\n")
    with pytest.raises(PromptKDError, match=r"images_variant_val.txt:4: variant 'Spitfire'"):
        build_dataset("FGVCAircraft", aircraft_root)


def test_imagenet_folder_scan(imagenet_root, imagenet_names):
    IMAGENET = imagenet_names
    ds = build_dataset("imagenet", imagenet_root)
    assert ds.class_ids == sorted(IMAGENET)
    assert ds.classnames == [IMAGENET[w] for w in sorted(IMAGENET)]
    assert len(ds.train) == 15 and ds.val == [] and len(ds.test) == 5
    assert ds.train[0].path.endswith("imagenet/images/train/n01440764/n01440764_0.JPEG")
    assert [it.label for it in ds.test] == [0, 1, 2, 3, 4]


def test_imagenet_val_folder_without_train_counterpart(imagenet_root, make_image):
    make_image(imagenet_root / "imagenet" / "images" / "val" / "n09999999" / "x.JPEG")
    with pytest.raises(PromptKDError, match="n09999999: class folder has no counterpart"):
        build_dataset("ImageNet", imagenet_root)


def test_imagenet_a_uses_the_wnid_subset(imagenet_a_root):
    ds = build_dataset("imagenet_a", imagenet_a_root)
    assert ds.class_ids == ["n01443537", "n01494475"]  # sorted folders, README.txt ignored
    assert ds.classnames == ["goldfish", "hammerhead shark"]
    assert ds.train == [] and len(ds.test) == 4
    assert [it.label for it in ds.test] == [0, 0, 1, 1]


def test_imagenet_a_classnames_fall_back_to_imagenet(imagenet_a_root, imagenet_root):
    (imagenet_a_root / "imagenet-adversarial" / "classnames.txt").unlink()
    assert build_dataset("ImageNetA", imagenet_a_root).classnames == ["goldfish", "hammerhead shark"]


def test_imagenet_r_missing_folder(data_root):
    with pytest.raises(PromptKDError, match="imagenet-rendition/imagenet-r: not found"):
        build_dataset("ImageNetR", data_root)


def test_imagenetv2_index_folders(imagenetv2_root, imagenet_names):
    IMAGENET = imagenet_names
    ds = build_dataset("ImageNetV2", imagenetv2_root)
    assert ds.class_ids == list(IMAGENET)
    assert [it.label for it in ds.test] == [0, 1, 2, 3, 4]
    assert ds.test[3].path.endswith("imagenetv2-matched-frequency-format-val/3/a.jpeg")
