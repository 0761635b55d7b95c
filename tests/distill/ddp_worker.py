"""One rank of the 2-process distillation test (run as a script with torchrun-style env vars)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # + tests/
import distill_helpers as helpers  # noqa: E402


def run(teacher_cfg, student_cfg, image_dir, out_dir):
    from promptkd.data.folders import labelled_folder
    from promptkd.engine import TrainConfig
    from promptkd.stages.distill import distill_models

    torch.set_num_threads(1)
    items, names = labelled_folder(image_dir)
    teacher = helpers.tiny_teacher(teacher_cfg)
    student = helpers.tiny_student(student_cfg, teacher.dim)
    cv = helpers.text_class_vectors(teacher, names)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0, progress=False)
    distill_models(teacher, student, cv, items, out_dir, train=cfg, kd_weight=100.0)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        run(*sys.argv[1:5])
    finally:
        dist.destroy_process_group()
