"""Datasets: CoOp benchmark builders, custom folders, Dassl-identical sampling, protocols, transforms."""

from promptkd.data.dataset import DatasetSplits, ImageDataset, Item, load_rgb, scan_images
from promptkd.data.folders import (
    folder_dataset,
    images_dataset,
    labelled_folder,
    read_classnames,
    split_file_dataset,
    unlabelled_folder,
)
from promptkd.data.protocols import base2novel, cross_dataset, domain_generalisation, teacher_split
from promptkd.data.registry import build_dataset, canonical_name, dataset_names
from promptkd.data.sampling import fewshot_for_seed, generate_fewshot, set_random_seed, subsample_classes
from promptkd.data.transforms import TestTransform, TrainTransform, View, sample_view, transforms_for

__all__ = [
    "DatasetSplits",
    "ImageDataset",
    "Item",
    "TestTransform",
    "TrainTransform",
    "View",
    "base2novel",
    "build_dataset",
    "canonical_name",
    "cross_dataset",
    "dataset_names",
    "domain_generalisation",
    "fewshot_for_seed",
    "folder_dataset",
    "generate_fewshot",
    "images_dataset",
    "labelled_folder",
    "load_rgb",
    "read_classnames",
    "sample_view",
    "scan_images",
    "set_random_seed",
    "split_file_dataset",
    "subsample_classes",
    "teacher_split",
    "transforms_for",
    "unlabelled_folder",
]
