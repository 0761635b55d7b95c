"""Data parallel distillation equals one process with the same global batch (synced BN included)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from ddp_worker import run
from distill_helpers import tiny_student, write_images
from launch import free_port, torchrun

from promptkd.artifacts import load_artifact


def test_two_process_gloo_run_equals_single_process(tiny_configs, tmp_path):
    t_cfg, s_cfg = tiny_configs
    write_images(tmp_path / "images", per_class=4)
    run(t_cfg, s_cfg, tmp_path / "images", tmp_path / "single")

    worker = Path(__file__).with_name("ddp_worker.py")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, str(worker), str(t_cfg), str(s_cfg), str(tmp_path / "images"), str(tmp_path / "ddp")]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out

    single, _ = load_artifact(tmp_path / "single" / "student.safetensors", kind="student")
    ddp, _ = load_artifact(tmp_path / "ddp" / "student.safetensors", kind="student")
    assert set(single) == set(ddp)
    assert ddp["projector.bn.num_batches_tracked"].item() == 4  # 2 epochs x 2 global batches
    for k in single:
        torch.testing.assert_close(ddp[k].float(), single[k].float(), atol=1e-5, rtol=1e-5, msg=k)
    initial = tiny_student(s_cfg, 32).trainable_tensors()
    assert not torch.allclose(single["vision.input"], initial["vision.input"])  # it did train


def test_two_nodes_equal_two_processes_on_one_node_and_one_process(tiny_configs, tmp_path):
    """torchrun with --nnodes 2 (two launches meeting at a c10d rendezvous on 127.0.0.1) trains the
    same student as --nproc-per-node 2 on one node and as one process with the same global batch."""
    t_cfg, s_cfg = tiny_configs
    write_images(tmp_path / "images", per_class=4)
    run(t_cfg, s_cfg, tmp_path / "images", tmp_path / "single")
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    args = [str(t_cfg), str(s_cfg), str(tmp_path / "images")]
    torchrun([worker, *args, str(tmp_path / "node")], nproc=2)
    torchrun([worker, *args, str(tmp_path / "nodes")], nnodes=2)
    single, _ = load_artifact(tmp_path / "single" / "student.safetensors", kind="student")
    for name in ("node", "nodes"):
        other, _ = load_artifact(tmp_path / name / "student.safetensors", kind="student")
        assert set(other) == set(single)
        # fp32 sums of the same per-sample gradients in another order (all-reduce of two halves): ~1e-7 relative
        for k in single:
            torch.testing.assert_close(other[k].float(), single[k].float(), atol=1e-5, rtol=1e-5, msg=k)
    assert not torch.allclose(single["vision.input"], tiny_student(s_cfg, 32).trainable_tensors()["vision.input"])
