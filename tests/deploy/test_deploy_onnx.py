"""ONNX export: parity with PyTorch on onnxruntime, dynamic batch, fp16, metadata."""

import onnx
import pytest
import torch

from promptkd.deploy import OnnxClassifier, StudentClassifier
from promptkd.errors import PromptKDError
from promptkd.stages.export import export_onnx, onnx_bytes


@pytest.fixture
def clf(tiny_kd):
    return StudentClassifier(tiny_kd.student, tiny_kd.cv)


def test_onnx_parity_dynamic_batch_and_metadata(clf, tmp_path):
    path = export_onnx(clf, tmp_path / "m.onnx")
    ort_clf = OnnxClassifier(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        diff = (ort_clf(x) - clf(x)).abs().max().item()
        assert diff <= 1e-3, f"batch {batch}: max abs logit diff {diff}"
    x = torch.randn(3, 3, 32, 32)
    assert [[n for n, _ in p] for p in ort_clf.predict(x, topk=4)] == [[n for n, _ in p] for p in clf.predict(x, topk=4)]

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["promptkd.format"] == "promptkd-onnx/1"
    assert ort_clf.classnames == clf.classnames and ort_clf.meta["image_size"] == 32
    assert ort_clf.meta["student"]["teacher_dim"] == 32 and ort_clf.meta["class_vectors_teacher"]["prompts_hash"]
    assert ort_clf.meta["mean"] == clf.transform.mean and ort_clf.meta["precision"] == "fp32"
    assert not list(tmp_path.glob(".m.onnx.*"))  # no temporary left behind


def test_fp16_export_runs_and_is_close(clf, tmp_path):
    path = export_onnx(clf, tmp_path / "m16.onnx", fp16=True)
    ort_clf = OnnxClassifier(path)
    x = torch.randn(2, 3, 32, 32)
    out = ort_clf(x)
    assert out.dtype == torch.float32 and out.shape == (2, len(clf.classnames))
    assert (out - clf(x)).abs().max().item() <= 0.05 * max(1.0, clf.logit_scale.item() / 14)
    assert ort_clf.meta["precision"] == "fp16"
    assert clf.class_vectors.dtype == torch.float32  # exporting fp16 did not touch the fp32 model


def test_onnx_without_metadata_is_refused(clf, tmp_path):
    path = tmp_path / "plain.onnx"
    path.write_bytes(onnx_bytes(clf, 32))
    with pytest.raises(PromptKDError, match="without promptkd metadata"):
        OnnxClassifier(path)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(PromptKDError, match="not a loadable ONNX"):
        OnnxClassifier(tmp_path / "junk.onnx")
