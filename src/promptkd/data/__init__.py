"""Datasets: CoOp benchmark builders, custom folders, Dassl-identical sampling, protocols, transforms.

Names are resolved on first use, so that `promptkd.data.protocols.PROTOCOLS` (an option's
choices) can be read without importing torch.
"""

from __future__ import annotations

from promptkd.lazy import lazy_attributes

_LAZY = {
    "DatasetSplits": "promptkd.data.dataset",
    "ImageDataset": "promptkd.data.dataset",
    "Item": "promptkd.data.dataset",
    "TestTransform": "promptkd.data.transforms",
    "TrainTransform": "promptkd.data.transforms",
    "View": "promptkd.data.transforms",
    "base2novel": "promptkd.data.protocols",
    "build_dataset": "promptkd.data.registry",
    "canonical_name": "promptkd.data.registry",
    "cross_dataset": "promptkd.data.protocols",
    "dataset_names": "promptkd.data.registry",
    "domain_generalisation": "promptkd.data.protocols",
    "fewshot_for_seed": "promptkd.data.sampling",
    "folder_dataset": "promptkd.data.folders",
    "generate_fewshot": "promptkd.data.sampling",
    "images_dataset": "promptkd.data.folders",
    "labelled_folder": "promptkd.data.folders",
    "load_rgb": "promptkd.data.dataset",
    "read_classnames": "promptkd.data.folders",
    "sample_view": "promptkd.data.transforms",
    "scan_images": "promptkd.data.dataset",
    "set_random_seed": "promptkd.data.sampling",
    "split_file_dataset": "promptkd.data.folders",
    "subsample_classes": "promptkd.data.sampling",
    "teacher_split": "promptkd.data.protocols",
    "transforms_for": "promptkd.data.transforms",
    "unlabelled_folder": "promptkd.data.folders",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
