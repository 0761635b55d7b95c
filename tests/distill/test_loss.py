"""The KD loss is exactly the official one, and only prompts and projector learn."""

import math

import pytest
import torch
from distill_helpers import make_models, text_class_vectors

from promptkd.models.projector import GlobalBatchNorm1d
from promptkd.stages.distill import class_logits, kd_loss, official_kd_weight


def hand_kl(s, t, T):
    """sum over batch and classes of p_t * (log p_t - log p_s), by loops."""
    total = 0.0
    for b in range(s.shape[0]):
        zs = [math.exp(v / T) for v in s[b].tolist()]
        zt = [math.exp(v / T) for v in t[b].tolist()]
        for c in range(s.shape[1]):
            ps, pt = zs[c] / sum(zs), zt[c] / sum(zt)
            total += pt * (math.log(pt) - math.log(ps))
    return total


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_loss_equals_hand_computation_for_both_reductions(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, generator=g) * 4, torch.randn(3, 5, generator=g) * 4
    kl = hand_kl(s, t, T)
    official = kd_loss(s, t, temperature=T, weight=1000.0, reduction="official")
    assert official.item() == pytest.approx(1000 * T * T * kl / (3 * 5), rel=1e-5)
    batchmean = kd_loss(s, t, temperature=T, weight=1.0, reduction="batchmean")
    assert batchmean.item() == pytest.approx(T * T * kl / 3, rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_official_kd_weights():
    assert official_kd_weight("fgvc_aircraft") == 200 == official_kd_weight("OxfordFlowers") == official_kd_weight("dtd")
    assert official_kd_weight("ImageNet") == 1000 == official_kd_weight("EuroSAT")
    assert official_kd_weight("dtd", protocol="cross") == 1000  # xd_train.sh: 1000 everywhere


def test_default_kd_weight_is_official_on_the_paper_datasets_and_per_image_elsewhere():
    from promptkd.stages.distill import CUSTOM_KD_PER_IMAGE, default_kd_weight, is_benchmark

    assert default_kd_weight("OxfordPets", "base2novel", 37) == 1000 and default_kd_weight("dtd", "base2novel", 47) == 200
    assert default_kd_weight("OxfordPets", "base2novel", 37, "batchmean") == pytest.approx(1000 / 37)
    assert default_kd_weight("imagenet_sketch", "dg", 1000) == 1000 and is_benchmark("ImageNetV2")
    for dataset in ("folder:/data/mine", "split:/x/split_zhou_Toy.json", "MyDataset"):
        assert not is_benchmark(dataset)
        assert default_kd_weight(dataset, "cross", 6) == CUSTOM_KD_PER_IMAGE * 6
        assert default_kd_weight(dataset, "base2novel", 6, "batchmean") == CUSTOM_KD_PER_IMAGE
    # the same per-image weight whatever the class count: the official loss divides by B*C
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    official = kd_loss(s, t, weight=default_kd_weight("folder:x", "cross", 6), reduction="official")
    batchmean = kd_loss(s, t, weight=default_kd_weight("folder:x", "cross", 6, "batchmean"), reduction="batchmean")
    assert official.item() == pytest.approx(batchmean.item(), rel=1e-5)


def test_only_prompts_and_projector_get_gradients(tiny_configs):
    teacher, student = make_models(tiny_configs)
    cv = text_class_vectors(teacher, ["red", "green", "blue"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        t_logits = class_logits(teacher.encode_images(x), cv.vectors, teacher.logit_scale)
    s_logits = class_logits(student(x), cv.vectors, student.logit_scale)
    kd_loss(s_logits, t_logits, weight=1000.0).backward()
    got = {n for n, p in student.named_parameters() if p.grad is not None}
    assert got == {n for n, p in student.named_parameters() if n.startswith(("image.prompts", "projector."))}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if n in got)
    assert all(p.grad is None for p in student.clip.model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert student.logit_scale.item() == pytest.approx(math.exp(student.clip.model.logit_scale.item()))


def test_projector_batchnorm_is_plain_batchnorm_without_process_group():
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_symmetric_kl_equals_hand_computation(T):
    """sym-kl: KL(t || s) + KL(s || t), scaled like the KL (weight, T^2, reduction); float32 softmax
    of logits ~N(0, 16) keeps the relative error near 1e-6, so rel=1e-5."""
    from promptkd.kd import KDSettings

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, generator=g) * 4, torch.randn(3, 5, generator=g) * 4
    both = hand_kl(s, t, T) + hand_kl(t, s, T)
    assert hand_kl(t, s, T) != pytest.approx(hand_kl(s, t, T), rel=1e-2)  # the two directions differ here
    official = kd_loss(s, t, temperature=T, weight=1000.0, reduction="official", loss="sym-kl")
    assert official.item() == pytest.approx(1000 * T * T * both / (3 * 5), rel=1e-5)
    batchmean = kd_loss(s, t, **KDSettings(T, 1.0, "batchmean", "sym-kl").loss_args())
    assert batchmean.item() == pytest.approx(T * T * both / 3, rel=1e-5)
    # several teachers' combined target comes as log-probabilities: the same loss
    log_p_t = torch.log_softmax(t / T, dim=-1)
    assert kd_loss(s, None, T, 1.0, "batchmean", teacher_log_probs=log_p_t, loss="sym-kl").item() == pytest.approx(
        batchmean.item(), rel=1e-6)


def test_kl_default_is_the_loss_as_it_was():
    """The default (`kl`, and KDSettings' default) computes the same float32 ops as before the
    option existed: bit-identical, not just close."""
    import torch.nn.functional as F

    from promptkd.kd import KDSettings

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 7, generator=g) * 4, torch.randn(8, 7, generator=g) * 4
    T, w = 2.0, 1000.0
    before = w * T * T * F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="sum",
                                  log_target=True) / s.numel()
    assert torch.equal(kd_loss(s, t, T, w, "official"), before)
    assert torch.equal(kd_loss(s, t, **KDSettings(T, w).loss_args()), before)
    assert KDSettings().kd_loss == "kl"


def test_a_run_resumes_only_with_the_kd_loss_it_started_with(tiny_configs, tmp_path):
    from distill_helpers import write_images

    from promptkd.engine import TrainConfig
    from promptkd.errors import PromptKDError
    from promptkd.kd import KDSettings
    from promptkd.stages.distill import distill_models

    items, names = write_images(tmp_path / "images", per_class=2)
    teacher, student = make_models(tiny_configs)
    cv = text_class_vectors(teacher, names)
    cfg = TrainConfig(epochs=1, batch_size=4, warmup_epochs=0, progress=False)
    sym = KDSettings(kd_weight=100.0, kd_loss="sym-kl")
    res = distill_models(teacher, student, cv, items, tmp_path / "run", train=cfg, kd=sym, baseline=False)
    assert res.metrics["kd_loss"] == "sym-kl" and res.metrics["kd_weight"] == 100.0
    with pytest.raises(PromptKDError, match="cannot resume.*kd_loss"):
        distill_models(teacher, student, cv, items, tmp_path / "run", train=cfg, resume=True, baseline=False,
                       kd=KDSettings(kd_weight=100.0))
