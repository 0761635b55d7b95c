"""The teacher interface and its maths: CLIP-style template ensembles, several teachers' targets
(mean and confidence-weighted), and the text-fitted projector's BatchNorm statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distill_helpers import tiny_student, write_images
from PIL import Image

from promptkd.errors import PromptKDError
from promptkd.kd import ensemble_log_probs, kd_loss
from promptkd.models import load_clip
from promptkd.models.teachers import ZeroShotTeacher
from promptkd.models.wrappers import Teacher
from promptkd.templates import CLIP_IMAGENET_TEMPLATES, DATASET_TEMPLATES, resolve_templates

TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]


def test_template_ensemble_is_clips_average_of_normalised_features(tiny_configs):
    """By hand: each template's text feature normalised, the mean over templates, normalised again."""
    clip = load_clip(str(tiny_configs[0]), init_seed=3)
    teacher = ZeroShotTeacher(clip, TEMPLATES)
    names = ["red fox", "blue_whale"]
    got = teacher.encode_classnames(names)
    with torch.no_grad():
        rows = []
        for name in ("red fox", "blue whale"):
            feats = [clip.model.encode_text(clip.tokenizer([t.format(name)]))[0] for t in TEMPLATES]
            mean = sum(f / f.norm() for f in feats) / len(feats)
            rows.append(mean / mean.norm())
    # fp32 text features of norm ~1: the two orders of summation agree to a few ulps
    assert torch.allclose(got, torch.stack(rows), atol=1e-6)
    # the averaging of unnormalised features (PromptSRC's reference) gives other vectors here
    one = ZeroShotTeacher(clip, TEMPLATES[:1]).encode_classnames(names)
    with torch.no_grad():
        plain = F.normalize(clip.model.encode_text(clip.tokenizer(["a photo of a red fox.", "a photo of a blue whale."])), dim=-1)
    assert torch.allclose(one, plain, atol=1e-6)
    assert teacher.identity()["templates"] == TEMPLATES


def test_template_means_of_normalised_and_of_raw_features(tiny_configs):
    """normalize_each: CLIP's classifier (each template counts the same) or PromptSRC's reference and
    the zero-shot baseline (raw features averaged: a template with longer features weighs more)."""
    from promptkd.models.teachers import template_class_vectors
    from promptkd.stages.teacher import IMAGENET_TEMPLATES, TeacherConfig, TeacherObjective

    clip = load_clip(str(tiny_configs[0]), init_seed=3)
    names, two = ["red fox", "blue_whale"], ["a photo of a {}.", "itap of my {}."]

    def vectors(templates, normalize_each):
        return template_class_vectors(clip.model.encode_text, clip.tokenizer, names, templates,
                                      normalize_each=normalize_each)

    with torch.no_grad():
        feats = [clip.model.encode_text(clip.tokenizer([t.format(n) for n in ("red fox", "blue whale")])) for t in two]
    norms = torch.stack([f.norm(dim=-1) for f in feats])
    assert ((norms[0] - norms[1]).abs() > 0.05 * norms.min(0).values).all()  # the templates' norms differ
    # one template: the normalised text feature either way (renormalising a unit vector: a few ulps)
    torch.testing.assert_close(vectors(two[:1], True), vectors(two[:1], False), atol=1e-6, rtol=0)
    torch.testing.assert_close(vectors(two[:1], True), F.normalize(feats[0], dim=-1), atol=1e-6, rtol=0)
    # two templates: each mode is its formula by hand (fp32 sums of two terms: a few ulps), and they differ
    by_hand_normalised = F.normalize(F.normalize(feats[0], dim=-1) + F.normalize(feats[1], dim=-1), dim=-1)
    by_hand_raw = F.normalize(feats[0] + feats[1], dim=-1)
    normalised, raw = vectors(two, True), vectors(two, False)
    torch.testing.assert_close(normalised, by_hand_normalised, atol=1e-6, rtol=0)
    torch.testing.assert_close(raw, by_hand_raw, atol=1e-6, rtol=0)
    assert (normalised - raw).norm(dim=-1).min() > 1e-3
    # the raw mean leans towards the template with the longer feature
    longer = F.normalize(torch.where((norms[0] > norms[1])[:, None], feats[0], feats[1]), dim=-1)
    assert ((raw * longer).sum(-1) > (normalised * longer).sum(-1)).all()
    # where each is used: PromptSRC's frozen text reference and the zero-shot baseline average raw features
    reference = TeacherObjective(Teacher(clip, vision_depth=0, text_depth=0), names, TeacherConfig()).text_reference
    torch.testing.assert_close(reference, vectors(IMAGENET_TEMPLATES, False), atol=0, rtol=0)
    assert (reference - vectors(IMAGENET_TEMPLATES, True)).norm(dim=-1).min() > 1e-3
    assert torch.equal(ZeroShotTeacher(clip, two).encode_classnames(names), normalised)


def test_named_template_sets():
    assert len(CLIP_IMAGENET_TEMPLATES) == 80 == len(set(CLIP_IMAGENET_TEMPLATES))
    assert resolve_templates("imagenet80") == list(CLIP_IMAGENET_TEMPLATES)
    assert resolve_templates("dataset", "oxford_pets") == [DATASET_TEMPLATES["OxfordPets"]]
    assert resolve_templates("dataset", "Caltech101") == ["a photo of a {}."]
    assert resolve_templates("a sketch of a {}.") == ["a sketch of a {}."]
    with pytest.raises(PromptKDError, match="benchmark --dataset"):
        resolve_templates("dataset", "images:/x")
    with pytest.raises(PromptKDError, match="not imagenet80"):
        resolve_templates("no-such-file.txt")


def test_templates_from_a_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a {} in the toy world.\n\nthe {}, drawn.\n")
    assert resolve_templates(str(path)) == ["a {} in the toy world.", "the {}, drawn."]
    path.write_text("no placeholder\n")
    with pytest.raises(PromptKDError, match="exactly one"):
        resolve_templates(str(path))


def _loop_target(logits, T, weights, confidence):
    """The combined target by a plain loop over images, classes and teachers (float64 Python maths)."""
    K, B, C = logits.shape
    out = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        probs = []
        for k in range(K):
            z = [float(v) / T for v in logits[k, b]]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            probs.append([v / sum(e) for v in e])
        w = [weights[k] * (max(probs[k]) if confidence else 1.0) for k in range(K)]
        for c in range(C):
            out[b, c] = sum(w[k] * probs[k][c] for k in range(K)) / sum(w)
    return out


@pytest.mark.parametrize("confidence", [False, True])
def test_ensemble_target_matches_a_plain_loop(confidence):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * torch.tensor([1.0, 4.0, 0.3]).view(3, 1, 1)
    weights = [1.0, 2.0, 0.5]
    T = 2.0
    got = ensemble_log_probs(list(logits), T, weights, "confidence" if confidence else "mean").exp().double()
    want = _loop_target(logits, T, [w / sum(weights) for w in weights], confidence)
    # fp32 log-sum-exp of probabilities in [1e-4, 1]: relative error ~1e-6
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_confidence_weighting_follows_the_sure_teacher():
    sure = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.4, 0.0]])
    mean = ensemble_log_probs([sure, unsure], 1.0).exp()[0]
    conf = ensemble_log_probs([sure, unsure], 1.0, mode="confidence").exp()[0]
    assert conf[0] > mean[0] > 0.5


def test_one_teacher_target_is_the_plain_kd_loss():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    plain = kd_loss(s, t, 2.0, 3.0, "official")
    combined = kd_loss(s, None, 2.0, 3.0, "official", teacher_log_probs=ensemble_log_probs([t], 2.0))
    assert torch.allclose(plain, combined, rtol=1e-6)
    doubled = kd_loss(s, None, 2.0, 3.0, "official", teacher_log_probs=ensemble_log_probs([t, t], 2.0, [1, 3]))
    assert torch.allclose(plain, doubled, rtol=1e-5)


def test_ensemble_weights_are_checked():
    with pytest.raises(PromptKDError, match="2 ensemble weights for 3 teachers"):
        ensemble_log_probs([torch.zeros(1, 2)] * 3, weights=[1, 1])
    with pytest.raises(PromptKDError, match="positive sum"):
        ensemble_log_probs([torch.zeros(1, 2)] * 2, weights=[0, 0])


def test_projector_fit_brings_text_to_its_class_and_bn_stats_come_from_the_images(tiny_configs, tmp_path):
    from promptkd.data.transforms import transforms_for
    from promptkd.stages.projector_init import fit_projector_on_text, text_pairs

    t_cfg, s_cfg = tiny_configs
    teacher = ZeroShotTeacher(load_clip(str(t_cfg), init_seed=4))
    student = tiny_student(s_cfg, teacher.dim)
    names = ["red", "green", "blue", "yellow"]
    W = teacher.encode_classnames(names)
    items, _ = write_images(tmp_path / "img", per_class=3)
    s_text, _, labels = text_pairs(student, teacher, names)

    def text_accuracy():  # BatchNorm on the statistics of the text batch, as in the fit
        student.projector.train()
        with torch.no_grad():
            pred = (F.normalize(student.projector(s_text), dim=-1) @ W.T).argmax(-1)
        return (pred == labels).float().mean().item()

    bn = student.projector.bn
    before = text_accuracy()
    fit_projector_on_text(student, teacher, W, names, items, device="cpu", seed=0, batch_size=64)
    # BatchNorm statistics: exactly those of the images' first projector layer (one batch of 12)
    test_tf = transforms_for(student.clip.preprocess_cfg)[1]
    x = torch.stack([test_tf(Image.open(p).convert("RGB")) for p, _ in items])
    with torch.no_grad():
        h = student.projector.fc1(student.image(x))
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(0, unbiased=True), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1
    assert text_accuracy() > max(before, 0.9)


def test_a_text_fitted_projector_learns_at_a_tenth_of_the_rate(tiny_configs):
    from promptkd.stages.projector_init import PROJECTOR_LR_SCALE, slow_down_projector

    t_cfg, s_cfg = tiny_configs
    steps = []
    for slowed in (False, True):
        student = tiny_student(s_cfg, 32)
        if slowed:
            slow_down_projector(student)
            slow_down_projector(student)  # once only
        before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        student(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).sum().backward()
        opt.step()
        steps.append({n: p.detach() - before[n] for n, p in student.named_parameters() if p.requires_grad})
    full, slow = steps
    for name in full:
        want = full[name] * (PROJECTOR_LR_SCALE if name.startswith("projector.") else 1.0)
        assert torch.allclose(slow[name], want, rtol=1e-4, atol=1e-8), name


def test_ensemble_baseline_encodes_each_teachers_test_images_once(tiny_configs, tmp_path):
    """Three teachers on base-to-novel: each teacher's own scores and the ensemble's come from one
    pass over the test images per teacher, and equal the separate computations bit for bit."""
    from distill_helpers import write_split_file

    from promptkd.data.protocols import build_protocol
    from promptkd.data.transforms import transforms_for
    from promptkd.engine.config import TrainConfig
    from promptkd.kd import class_logits
    from promptkd.metrics import encode_items, evaluate_splits, harmonic_mean
    from promptkd.stages.distill import _ensemble_baseline

    name, _ = write_split_file(tmp_path, per_class=7)
    protocol = build_protocol("base2novel", name)
    t_cfg = tiny_configs[0]
    teachers = [ZeroShotTeacher(load_clip(str(t_cfg), init_seed=seed), TEMPLATES[:k]) for seed, k in ((4, 1), (5, 3), (6, 2))]
    members = [(t, t.encode_classnames(protocol.classnames), None) for t in teachers]
    encoded = [0] * len(teachers)

    def counted(k, encode):
        def encode_images(x):
            encoded[k] += len(x)
            return encode(x)
        return encode_images

    plain = [t.encode_images for t in teachers]
    for k, t in enumerate(teachers):
        t.encode_images = counted(k, plain[k])
    weights = [0.5, 0.3, 0.2]
    got = _ensemble_baseline(members, protocol, 2.0, weights, "confidence", 3, TrainConfig(progress=False))
    n_test = sum(len(s.items) for s in protocol.test.values())
    assert n_test == 8 and encoded == [n_test] * 3  # 2 test images per class, 4 classes
    # the separate computations: evaluate_splits per further teacher, logits of every teacher combined
    for k, t in enumerate(teachers):
        t.encode_images = plain[k]
    tf = [transforms_for(t.clip.preprocess_cfg)[1] for t in teachers]
    want_alone = [evaluate_splits(t.encode_images, W, protocol.test, tf[k], batch_size=3, progress=False)
                  for k, (t, W, _) in enumerate(members)]
    assert got["more_teachers"] == want_alone[1:] and set(want_alone[1]) == {"base", "novel", "hm"}
    want = {}
    for split_name, split in protocol.test.items():
        logits = []
        for k, (t, W, _) in enumerate(members):
            feats, labels = encode_items(t.encode_images, split.items, tf[k], batch_size=3, progress=False)
            logits.append(class_logits(feats, W[split.classes], t.logit_scale))
        pred = ensemble_log_probs(logits, 2.0, weights, "confidence").argmax(-1)
        want[split_name] = 100.0 * (pred == labels).float().mean().item()
    want["hm"] = harmonic_mean(want["base"], want["novel"])
    assert got["ensemble"] == want
