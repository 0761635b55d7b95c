import json
import logging

import pytest

from promptkd.data import (
    build_dataset,
    folder_dataset,
    images_dataset,
    labelled_folder,
    read_classnames,
    scan_images,
    split_file_dataset,
    unlabelled_folder,
)
from promptkd.errors import PromptKDError


def test_labelled_folder_sorted_classes_recursive(labelled_tree):
    items, folders = labelled_folder(labelled_tree)
    assert folders == ["aardvark", "hot_dog", "zebra"]
    assert [it.label for it in items] == [0, 0, 1, 1, 2, 2, 2]
    assert items[-1].path.endswith("zebra/nested/deep.jpg")  # recursive, sorted; .txt ignored


def test_folder_dataset_without_splits(labelled_tree):
    ds = build_dataset(f"folder:{labelled_tree}")
    assert ds.classnames == ["aardvark", "hot dog", "zebra"]
    assert ds.train == ds.test and ds.val == []


def test_folder_dataset_with_split_subfolders(tmp_path, make_image):
    for split, classes in (("train", "abc"), ("val", "ab"), ("test", "bc")):
        for c in classes:
            make_image(tmp_path / split / c / f"{split}.png")
    ds = build_dataset("folder:.", tmp_path)  # relative to root
    assert ds.classnames == ["a", "b", "c"]
    assert [it.label for it in ds.val] == [0, 1]
    assert [it.label for it in ds.test] == [1, 2]


@pytest.mark.parametrize("names", [("train", "valid", "test"), ("Train", "Validation", "Test"),
                                   ("training", "val", "testing")])
def test_folder_with_export_style_split_names(tmp_path, make_image, names):
    """train/ valid/ test/ (Roboflow, Kaggle exports) is three splits of two classes, not three classes."""
    for split in names:
        for c in ("cat", "dog"):
            make_image(tmp_path / split / c / f"{split}.png")
    ds = folder_dataset(tmp_path)
    assert ds.classnames == ["cat", "dog"]
    assert [len(ds.train), len(ds.val), len(ds.test)] == [2, 2, 2]
    assert ds.val[0].path.startswith(str(tmp_path / names[1]))


def test_folder_mixing_split_and_class_folders_is_an_error(tmp_path, make_image):
    for sub in ("train", "test", "zebra"):
        make_image(tmp_path / sub / "a" / "x.png")
    with pytest.raises(PromptKDError, match="mixes split folders"):
        folder_dataset(tmp_path)


def test_split_subfolder_with_unknown_class(tmp_path, make_image):
    make_image(tmp_path / "train" / "a" / "x.png")
    make_image(tmp_path / "test" / "b" / "x.png")
    with pytest.raises(PromptKDError, match="not present in the train split"):
        folder_dataset(tmp_path)


def test_empty_class_folder_is_an_error(labelled_tree):
    (labelled_tree / "empty").mkdir()
    with pytest.raises(PromptKDError, match="empty: class folder has no images"):
        folder_dataset(labelled_tree)


def test_duplicate_class_names_are_an_error(labelled_tree, make_image):
    make_image(labelled_tree / "hot dog" / "0.png")  # same name as hot_dog once underscores become spaces
    with pytest.raises(PromptKDError, match="duplicate class name 'hot dog'"):
        folder_dataset(labelled_tree)


def test_unlabelled_folder(labelled_tree):
    items = unlabelled_folder(labelled_tree)
    assert len(items) == 7 and {it.label for it in items} == {-1}
    ds = build_dataset("images:mydomain", labelled_tree.parent)
    assert ds.classnames == [] and ds.train == items and ds.test == []


def test_corrupt_files_skipped_with_count_or_fatal_when_strict(labelled_tree, caplog):
    (labelled_tree / "zebra" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (labelled_tree / "aardvark" / "0.png").read_bytes()
    (labelled_tree / "aardvark" / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        result = scan_images(labelled_tree)
    assert len(result.paths) == 7 and len(result.skipped) == 2
    assert "skipped 2 unreadable file(s)" in caplog.text
    assert len(images_dataset(labelled_tree).train) == 7
    with pytest.raises(PromptKDError, match="truncated.png: not a readable image"):
        scan_images(labelled_tree, strict=True)
    (labelled_tree / "aardvark" / "truncated.png").unlink()
    with pytest.raises(PromptKDError, match="broken.jpg: not a readable image"):
        build_dataset(f"folder:{labelled_tree}", strict=True)


def test_decompression_bomb_is_skipped(tmp_path, make_image):
    make_image(tmp_path / "small.png", size=(4, 4))
    make_image(tmp_path / "huge.png", size=(32, 32))
    result = scan_images(tmp_path, max_pixels=100)
    assert [p.rsplit("/", 1)[1] for p in result.paths] == ["small.png"]
    assert "decompression bomb" in result.skipped[0][1]
    with pytest.raises(PromptKDError, match="huge.png"):
        scan_images(tmp_path, strict=True, max_pixels=100)


def test_pil_decompression_bomb_error_is_skipped(tmp_path, make_image, monkeypatch):
    from PIL import Image

    make_image(tmp_path / "huge.png", size=(32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises past twice this
    result = scan_images(tmp_path)
    assert result.paths == [] and "decompression bomb" in result.skipped[0][1]


def test_classnames_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ngolden_retriever\n\n  tabby cat \n# done\n")
    assert read_classnames(path) == ["golden retriever", "tabby cat"]
    path.write_text("cat\nCat\n")
    with pytest.raises(PromptKDError, match="duplicate class name 'Cat'"):
        read_classnames(path)
    with pytest.raises(PromptKDError, match="nope.txt: class-names file not found"):
        read_classnames(tmp_path / "nope.txt")


def _custom_split(tmp_path, make_image, entries):
    for rel in ("a/1.png", "b/1.png", "b/2.png"):
        make_image(tmp_path / "imgs" / rel)
    split_path = tmp_path / "my_split.json"
    split_path.write_text(json.dumps(entries))
    return split_path


def test_split_file_with_image_root(tmp_path, make_image):
    split_path = _custom_split(tmp_path, make_image, {
        "train": [["a/1.png", 0, "apple"], ["b/1.png", 1, "big_banana"]], "test": [["b/2.png", 1, "big_banana"]]
    })
    ds = split_file_dataset(split_path, tmp_path / "imgs")
    assert ds.classnames == ["apple", "big banana"] and ds.val == [] and len(ds.test) == 1
    ds2 = build_dataset(f"split:{split_path}", tmp_path / "imgs")
    assert ds2.train == ds.train


def test_split_file_with_classnames_file_and_range_check(tmp_path, make_image):
    (tmp_path / "names.txt").write_text("apple\nbanana\n")
    split_path = _custom_split(tmp_path, make_image, {"train": [["a/1.png", 0], ["b/1.png", 1]]})
    ds = split_file_dataset(split_path, tmp_path / "imgs", tmp_path / "names.txt")
    assert ds.classnames == ["apple", "banana"]
    split_path.write_text(json.dumps({"train": [["a/1.png", 2]]}))
    with pytest.raises(PromptKDError, match=r"label 2 out of range 0\.\.2-1"):
        split_file_dataset(split_path, tmp_path / "imgs", tmp_path / "names.txt")


def test_split_file_missing_image(tmp_path, make_image):
    split_path = _custom_split(tmp_path, make_image, {"train": [["a/1.png", 0, "a"], ["a/9.png", 0, "a"]]})
    with pytest.raises(PromptKDError, match=r"1 of 2 listed images are missing, e\.g\. .*a/9\.png"):
        split_file_dataset(split_path, tmp_path / "imgs")


def test_bad_prefix_usage():
    with pytest.raises(PromptKDError, match="a path is needed"):
        build_dataset("folder:")
