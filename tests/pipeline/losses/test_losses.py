"""Specification of the feature-distillation losses in pipeline.losses.

Each method's value on tiny tensors is recomputed here with explicit Python loops, written
from the method's definition rather than from the implementation. Then every method is held
to the properties detection needs: padding never matters, a padded image scores like its
cropped self, identical features give 0, gradients reach the student and are finite, and
the relational methods stay within their sample budget.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.losses import DISTILL_LOSS_REGISTRY, METHODS, DistillLoss, build_distill_loss
from pipeline.losses.attention import AttentionLoss
from pipeline.losses.base import evenly_spaced, sample_valid_vectors, valid_vectors
from pipeline.losses.hint import HintLoss
from pipeline.losses.kdsvd import KDSVDLoss, top_right_singular_vectors
from pipeline.losses.nst import NSTLoss
from pipeline.losses.pkt import PKTLoss
from pipeline.losses.rkd import RKDLoss
from pipeline.losses.similarity import SimilarityLoss

ALL_METHODS = ("hint", "attention", "similarity", "nst", "rkd", "pkt", "kdsvd")
PER_IMAGE_METHODS = tuple(m for m in ALL_METHODS if m != "similarity")  # similarity relates images


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_mask(batch: int, height: int, width: int, valid: list[tuple[int, int]]) -> torch.Tensor:
    """Mask (B, 1, H, W), True on the top-left valid[b] = (h, w) box of each image (detectron2 pads bottom/right)."""
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(valid):
        mask[b, :, :h, :w] = True
    return mask


def valid_positions(mask: torch.Tensor, b: int) -> list[tuple[int, int]]:
    _, _, height, width = mask.shape
    return [(y, x) for y in range(height) for x in range(width) if mask[b, 0, y, x]]


def smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def fill_padding(features: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Put huge, varying values on the padding: a loss that reads padding changes or overflows."""
    noise = (torch.randn(features.shape, generator=seeded(99)).sign() * value).to(features.device)
    return torch.where(mask, features, noise)


# Two non-square levels, finest first; image 1 is padded at both levels.
LEVEL_SHAPES = [(6, 8), (3, 4)]
LEVEL_VALID = [[(6, 8), (4, 5)], [(3, 4), (2, 3)]]


def two_level_batch(channels_student: int = 4, channels_teacher: int = 4, seed: int = 0, device="cpu"):
    """Students, teachers and masks of two levels, drawn on the CPU (the same values on every device), on device."""
    g = seeded(seed)
    students = [torch.randn(2, channels_student, h, w, generator=g) for h, w in LEVEL_SHAPES]
    teachers = [torch.randn(2, channels_teacher, h, w, generator=g) for h, w in LEVEL_SHAPES]
    masks = [box_mask(2, h, w, valid) for (h, w), valid in zip(LEVEL_SHAPES, LEVEL_VALID)]
    return tuple([x.to(device) for x in part] for part in (students, teachers, masks))


# --------------------------------------------------------------------------- registry


def test_every_method_is_registered_under_its_name():
    assert set(ALL_METHODS) <= set(METHODS)  # the other seven: tests/test_losses_family.py
    classes = {"hint": HintLoss, "attention": AttentionLoss, "similarity": SimilarityLoss, "nst": NSTLoss,
               "rkd": RKDLoss, "pkt": PKTLoss, "kdsvd": KDSVDLoss}
    for name, cls in classes.items():
        assert DISTILL_LOSS_REGISTRY.get(name) is cls
        loss = build_distill_loss(name)
        assert isinstance(loss, cls) and isinstance(loss, DistillLoss) and loss.method == name


def test_build_passes_keyword_arguments():
    assert build_distill_loss("rkd", max_samples=64).max_samples == 64
    assert build_distill_loss("kdsvd", k=2).k == 2


def test_unknown_method_raises_value_error_listing_the_names():
    with pytest.raises(ValueError) as error:
        build_distill_loss("fitnet")
    message = str(error.value)
    assert "'fitnet'" in message
    assert ", ".join(sorted(METHODS)) in message


# --------------------------------------------------------------------------- shared helpers


def test_evenly_spaced_is_deterministic_distinct_and_bounded():
    assert evenly_spaced(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(10, 4).tolist() == [0, 2, 5, 7]
    picked = evenly_spaced(54_000, 128)
    assert picked.tolist() == evenly_spaced(54_000, 128).tolist()
    assert len(set(picked.tolist())) == 128 and picked.max() < 54_000
    with pytest.raises(ValueError):
        evenly_spaced(10, 0)


def test_valid_vectors_and_sampling_take_image_positions_in_row_major_order():
    features = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)
    mask = box_mask(2, 2, 3, [(2, 3), (1, 2)])
    expected = [[features[b, :, y, x].tolist() for y, x in valid_positions(mask, b)] for b in range(2)]
    assert [v.tolist() for v in valid_vectors(features, mask)] == expected
    everything = expected[0] + expected[1]  # 6 + 2 valid positions
    assert sample_valid_vectors(features, mask, 100).tolist() == everything
    assert sample_valid_vectors(features, mask, 4).tolist() == [everything[i] for i in (0, 2, 4, 6)]


def test_inputs_are_checked():
    s, t, m = two_level_batch()
    loss = HintLoss()
    with pytest.raises(ValueError, match="one student, teacher and mask"):
        loss(s, t[:1], m)
    with pytest.raises(ValueError, match="bool"):
        loss(s, t, [mask.float() for mask in m])
    with pytest.raises(ValueError, match="H, W"):
        loss(s, [t[1], t[0]], m)
    with pytest.raises(ValueError, match="no FPN levels"):
        loss([], [], [])


def test_the_loss_is_the_mean_over_levels():
    s, t, m = two_level_batch()
    loss = HintLoss()
    per_level = [loss([s[i]], [t[i]], [m[i]]) for i in range(2)]
    torch.testing.assert_close(loss(s, t, m), (per_level[0] + per_level[1]) / 2)


# --------------------------------------------------------------------------- values by hand


def test_hint_value_by_hand(device):
    g = seeded(1)
    s, t = torch.randn(2, 2, 2, 2, generator=g), torch.randn(2, 2, 2, 2, generator=g)
    mask = box_mask(2, 2, 2, [(2, 2), (2, 1)])  # 4 + 2 valid positions
    total = 0.0
    for b in range(2):
        for y, x in valid_positions(mask, b):
            for c in range(2):
                total += (s[b, c, y, x].item() - t[b, c, y, x].item()) ** 2
    expected = total / (6 * 2)  # valid positions x channels
    assert HintLoss()([s.to(device)], [t.to(device)], [mask.to(device)]).item() == pytest.approx(expected, rel=1e-6)


def test_hint_rejects_different_widths():
    with pytest.raises(ValueError, match="student 3 and teacher 2"):
        HintLoss()([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 2, 2, 2)], [box_mask(1, 2, 2, [(2, 2)])])


def test_attention_value_by_hand():
    g = seeded(2)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 2, 2, 2, generator=g)  # widths differ
    mask = box_mask(2, 2, 2, [(2, 2), (1, 2)])
    per_image = []
    for b in range(2):
        positions = valid_positions(mask, b)

        def attention(f):
            channels = f.shape[1]
            energy = {p: sum(f[b, c, p[0], p[1]].item() ** 2 for c in range(channels)) / channels for p in positions}
            norm = math.sqrt(sum(e * e for e in energy.values()))
            return {p: e / norm for p, e in energy.items()}

        a_s, a_t = attention(s), attention(t)
        per_image.append(sum((a_s[p] - a_t[p]) ** 2 for p in positions) / len(positions))
    expected = sum(per_image) / 2
    assert AttentionLoss()([s], [t], [mask]).item() == pytest.approx(expected, rel=1e-5)


def test_similarity_value_by_hand():
    g = seeded(3)
    s, t = torch.randn(2, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    mask = box_mask(2, 2, 2, [(2, 2), (2, 1)])

    def normalised_gram(f):
        flat = []
        for b in range(2):  # padding counts as 0
            flat.append([f[b, c, y, x].item() if mask[b, 0, y, x] else 0.0
                         for c in range(f.shape[1]) for y in range(2) for x in range(2)])
        gram = [[sum(a * b for a, b in zip(flat[i], flat[j])) for j in range(2)] for i in range(2)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in gram]

    g_s, g_t = normalised_gram(s), normalised_gram(t)
    expected = sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(2) for j in range(2)) / 2**2
    assert SimilarityLoss()([s], [t], [mask]).item() == pytest.approx(expected, rel=1e-5)


def test_similarity_is_zero_with_one_image_per_batch():
    g = seeded(4)
    s, t = torch.randn(1, 2, 3, 3, generator=g), torch.randn(1, 2, 3, 3, generator=g)
    assert SimilarityLoss()([s], [t], [box_mask(1, 3, 3, [(2, 3)])]).item() == 0.0


def test_nst_value_by_hand():
    g = seeded(5)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 2, 2, 2, generator=g)  # widths differ
    mask = box_mask(2, 2, 2, [(2, 2), (2, 2)])
    mask[1, 0, 1, 1] = False  # image 1 has 3 valid positions

    def unit_channel_maps(f, b):
        maps = []
        for c in range(f.shape[1]):
            values = [f[b, c, y, x].item() for y, x in valid_positions(mask, b)]
            norm = math.sqrt(sum(v * v for v in values))
            maps.append([v / norm for v in values])
        return maps

    def mean_kernel(a, b):
        values = [sum(x * y for x, y in zip(ai, bj)) ** 2 for ai in a for bj in b]
        return sum(values) / len(values)

    per_image = []
    for b in range(2):
        m_s, m_t = unit_channel_maps(s, b), unit_channel_maps(t, b)
        per_image.append(mean_kernel(m_t, m_t) + mean_kernel(m_s, m_s) - 2 * mean_kernel(m_s, m_t))
    expected = sum(per_image) / 2
    assert NSTLoss()([s], [t], [mask]).item() == pytest.approx(expected, rel=1e-5)


def reference_rkd(student: list[list[float]], teacher: list[list[float]]) -> float:
    """RKD with weights 25 (distance) and 50 (angle), written out pair by pair and triple by triple."""
    n = len(student)

    def distances(points):
        d = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def cosine_at(points, i, j, k):
        a = [p - q for p, q in zip(points[j], points[i])]
        b = [p - q for p, q in zip(points[k], points[i])]
        norm_a, norm_b = math.hypot(*a), math.hypot(*b)
        if norm_a == 0 or norm_b == 0:
            return 0.0
        return sum(x * y for x, y in zip(a, b)) / (norm_a * norm_b)

    d_s, d_t = distances(student), distances(teacher)
    distance_loss = sum(smooth_l1(d_s[i][j] - d_t[i][j]) for i in range(n) for j in range(n)) / n**2
    angle_loss = sum(
        smooth_l1(cosine_at(student, i, j, k) - cosine_at(teacher, i, j, k))
        for i in range(n) for j in range(n) for k in range(n)
    ) / n**3
    return 25 * distance_loss + 50 * angle_loss


def test_rkd_value_by_hand(device):
    g = seeded(6)
    s, t = torch.randn(1, 2, 2, 2, generator=g), 3 * torch.randn(1, 3, 2, 2, generator=g)  # widths differ
    mask = box_mask(1, 2, 2, [(2, 2)])
    mask[0, 0, 1, 1] = False  # 3 samples
    positions = valid_positions(mask, 0)
    student = [[s[0, c, y, x].item() for c in range(2)] for y, x in positions]
    teacher = [[t[0, c, y, x].item() for c in range(3)] for y, x in positions]
    value = RKDLoss()([s.to(device)], [t.to(device)], [mask.to(device)]).item()
    assert value == pytest.approx(reference_rkd(student, teacher), rel=1e-5)


def test_pkt_value_by_hand(device):
    g = seeded(7)
    s, t = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 2, 2, 2, generator=g)
    mask = box_mask(1, 2, 2, [(1, 2)])
    mask[0, 0, 1, 0] = True  # 3 samples
    positions = valid_positions(mask, 0)
    eps = 1e-7

    def probabilities(f):
        rows = [[f[0, c, y, x].item() for c in range(f.shape[1])] for y, x in positions]
        units = [[v / (math.sqrt(sum(w * w for w in row)) + eps) for v in row] for row in rows]
        kernel = [[(sum(a * b for a, b in zip(ui, uj)) + 1) / 2 for uj in units] for ui in units]
        return [[v / sum(row) for v in row] for row in kernel]

    p_s, p_t = probabilities(s), probabilities(t)
    n = len(positions)
    expected = sum(
        p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(n) for j in range(n)
    ) / n**2
    assert PKTLoss()([s.to(device)], [t.to(device)], [mask.to(device)]).item() == pytest.approx(expected, rel=1e-4)


def test_kdsvd_value_by_hand():
    # Level 1 (finest) is 1x3 with its last position padded; level 2 is 1x2. Two channels.
    # Rows are positions; each map is built so its top right singular vector is known:
    #   teacher level 1 rows (3, 0), (0, 1)        -> v = (1, 0)
    #   teacher level 2 rows (0, 2), (1, 0)        -> v = (0, 1)
    #   student level 1 rows 3(.8, .6), (-.6, .8)  -> v = (.8, .6)  (the other candidate, (-.6, .8), aligns worse)
    #   student level 2 rows (0, -2), (1, 0)       -> v = +-(0, 1), aligned to the teacher's sign: (0, 1)
    def level(rows, width):
        f = torch.full((1, 2, 1, width), 1e6)  # the padded position holds garbage
        for x, row in enumerate(rows):
            f[0, :, 0, x] = torch.tensor(row)
        return f

    teachers = [level([(3.0, 0.0), (0.0, 1.0)], 3), level([(0.0, 2.0), (1.0, 0.0)], 2)]
    students = [level([(2.4, 1.8), (-0.6, 0.8)], 3), level([(0.0, -2.0), (1.0, 0.0)], 2)]
    masks = [box_mask(1, 1, 3, [(1, 2)]), box_mask(1, 1, 2, [(1, 2)])]

    def rbf(coarse, fine):  # [c][c'] = exp(-(coarse[c] - fine[c'])^2 / 8)
        return [[math.exp(-((a - b) ** 2) / 8) for b in fine] for a in coarse]

    r_t, r_s = rbf((0.0, 1.0), (1.0, 0.0)), rbf((0.0, 1.0), (0.8, 0.6))
    expected = sum((r_s[i][j] - r_t[i][j]) ** 2 for i in range(2) for j in range(2))
    # With k = 1 the teacher's singular-value weight is 1; one image, one level pair.
    assert KDSVDLoss()(students, teachers, masks).item() == pytest.approx(expected, rel=1e-6)


def reference_kdsvd(students, teachers, masks, k: int = 1) -> float:
    """KD-SVD restated with numpy's SVD: per image and level, top-k (teacher) and top-(k+3) (student)
    right singular vectors of the valid-positions x channels matrix; teacher signs fixed by their
    largest entry; each student vector picked and signed by |cosine| with the teacher's; both weighted
    by the teacher's normalised singular values; RBF between consecutive levels."""
    batch = students[0].shape[0]

    def directions(f, mask, b):
        rows = np.array([[f[b, c, y, x].item() for c in range(f.shape[1])] for y, x in valid_positions(mask, b)])
        _, values, vt = np.linalg.svd(rows, full_matrices=False)
        return vt, values

    weighted = {"s": [], "t": []}
    for s, t, mask in zip(students, teachers, masks):
        per_image_s, per_image_t = [], []
        for b in range(batch):
            vt_t, values_t = directions(t, mask, b)
            vt_s, _ = directions(s, mask, b)
            weights = values_t[:k] / np.linalg.norm(values_t[:k])
            teacher_vectors, student_vectors = [], []
            for i in range(k):
                v = vt_t[i] * np.sign(vt_t[i][np.argmax(np.abs(vt_t[i]))])
                cosines = [float(candidate @ v) for candidate in vt_s[: k + 3]]
                best = int(np.argmax(np.abs(cosines)))
                teacher_vectors.append(v * weights[i])
                student_vectors.append(vt_s[best] * np.sign(cosines[best]) * weights[i])
            per_image_t.append(teacher_vectors)
            per_image_s.append(student_vectors)
        weighted["t"].append(per_image_t)
        weighted["s"].append(per_image_s)

    pair_losses = []
    for level in range(1, len(students)):
        per_image = []
        for b in range(batch):
            total = 0.0
            for i in range(k):
                s_fine, s_coarse = weighted["s"][level - 1][b][i], weighted["s"][level][b][i]
                t_fine, t_coarse = weighted["t"][level - 1][b][i], weighted["t"][level][b][i]
                for c in range(len(s_coarse)):
                    for c2 in range(len(s_fine)):
                        r_s = math.exp(-((s_coarse[c] - s_fine[c2]) ** 2) / 8)
                        r_t = math.exp(-((t_coarse[c] - t_fine[c2]) ** 2) / 8)
                        total += (r_s - r_t) ** 2
            per_image.append(total)
        pair_losses.append(sum(per_image) / batch)
    return sum(pair_losses) / len(pair_losses)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_a_numpy_svd_restatement(k, device):
    g = seeded(8)
    shapes, valid = [(6, 5), (3, 3), (2, 2)], [[(6, 5), (5, 3)], [(3, 3), (3, 2)], [(2, 2), (2, 1)]]
    students = [torch.randn(2, 4, h, w, generator=g) for h, w in shapes]
    teachers = [torch.randn(2, 4, h, w, generator=g) for h, w in shapes]
    masks = [box_mask(2, h, w, v) for (h, w), v in zip(shapes, valid)]
    # Image 1's last level has 2 valid positions: the student gets 2 candidates, not k + 3.
    expected = reference_kdsvd(students, teachers, masks, k=k)
    on_device = [[x.to(device) for x in part] for part in (students, teachers, masks)]
    assert KDSVDLoss(k=k)(*on_device).item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_kdsvd_needs_two_levels_and_equal_widths():
    s, t, m = two_level_batch()
    with pytest.raises(ValueError, match="at least 2 levels"):
        KDSVDLoss()(s[:1], t[:1], m[:1])
    s, t, m = two_level_batch(channels_student=3)
    with pytest.raises(ValueError, match="student 3 and teacher 4"):
        KDSVDLoss()(s, t, m)


def test_kdsvd_singular_vector_gradient_matches_torch_svd_on_a_regular_matrix():
    x = torch.randn(7, 4, dtype=torch.float64, generator=seeded(9), requires_grad=True)
    weights = torch.randn(4, 2, dtype=torch.float64, generator=seeded(10))

    def signed(v):  # fix the sign so both decompositions give the same vectors
        return v * torch.sign(v[v.abs().argmax(dim=0), torch.arange(v.shape[1])])

    ours = torch.autograd.grad((signed(top_right_singular_vectors(x, 2)[0]) * weights).sum(), x)[0]
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    torchs = torch.autograd.grad((signed(vh.T[:, :2]) * weights).sum(), x)[0]
    torch.testing.assert_close(ours, torchs)


@pytest.mark.parametrize(
    "degenerate",
    ["zero map", "constant map", "repeated channels", "fewer positions than channels"],
)
def test_kdsvd_gradients_stay_finite_on_degenerate_maps(degenerate, device):
    g = seeded(11)
    s, t, m = two_level_batch(channels_student=6, channels_teacher=6)
    if degenerate == "zero map":
        s[0] = torch.zeros_like(s[0])
    elif degenerate == "constant map":  # rank 1: one nonzero singular value, the rest all 0
        s[0] = torch.ones_like(s[0])
    elif degenerate == "repeated channels":
        s[0] = s[0][:, :2].repeat(1, 3, 1, 1)
    else:  # 2 x 2 level with 6 channels, like p6 of a small image
        s.append(torch.randn(2, 6, 2, 2, generator=g))
        t.append(torch.randn(2, 6, 2, 2, generator=g))
        m.append(box_mask(2, 2, 2, [(2, 2), (1, 1)]))
    s, t, m = ([x.to(device) for x in part] for part in (s, t, m))
    s = [level.requires_grad_() for level in s]
    loss = KDSVDLoss()(s, t, m)
    loss.backward()
    assert torch.isfinite(loss)
    for level in s:
        assert torch.isfinite(level.grad).all()


# --------------------------------------------------------------------------- properties of every method


@pytest.mark.parametrize("method", ALL_METHODS)
def test_padding_content_does_not_change_the_loss(method, device):
    s, t, m = two_level_batch(device=device)
    loss = build_distill_loss(method)
    clean = loss(s, t, m)
    for value in (1e30, float("inf")):
        noisy = loss([fill_padding(f, mask, value) for f, mask in zip(s, m)],
                     [fill_padding(f, mask, value) for f, mask in zip(t, m)], m)
        assert noisy.item() == pytest.approx(clean.item(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("method", PER_IMAGE_METHODS)
def test_padded_image_scores_like_the_image_cropped_to_its_valid_region(method, device):
    s, t, m = two_level_batch(device=device)
    one = slice(1, 2)  # image 1 is the padded one
    padded = build_distill_loss(method)([f[one] for f in s], [f[one] for f in t], [mask[one] for mask in m])
    crops = [valid[1] for valid in LEVEL_VALID]
    cropped = build_distill_loss(method)(
        [f[one, :, :h, :w] for f, (h, w) in zip(s, crops)],
        [f[one, :, :h, :w] for f, (h, w) in zip(t, crops)],
        [mask[one, :, :h, :w] for mask, (h, w) in zip(m, crops)],
    )
    assert padded.item() == pytest.approx(cropped.item(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("method", ["rkd", "pkt"])
def test_sampling_methods_score_a_padded_image_like_its_crop_when_subsampling(method, device):
    s, t, m = two_level_batch(device=device)
    one, (h, w) = slice(1, 2), LEVEL_VALID[0][1]
    loss = build_distill_loss(method, max_samples=7)
    padded = loss([s[0][one]], [t[0][one]], [m[0][one]])
    cropped = loss([s[0][one, :, :h, :w]], [t[0][one, :, :h, :w]], [m[0][one, :, :h, :w]])
    assert padded.item() == pytest.approx(cropped.item(), rel=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_identical_student_and_teacher_give_zero(method, device):
    s, _, m = two_level_batch(device=device)
    assert abs(build_distill_loss(method)(s, [f.clone() for f in s], m).item()) < 1e-6


@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradients_reach_the_student_are_finite_and_skip_padding(method, device):
    s, t, m = two_level_batch(device=device)
    s = [f.requires_grad_() for f in s]
    build_distill_loss(method)(s, t, m).backward()
    for f, mask in zip(s, m):
        assert torch.isfinite(f.grad).all()
        assert (f.grad[~mask.expand_as(f)] == 0).all()
    assert any(f.grad.abs().sum() > 0 for f in s)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_inputs_give_a_float32_loss(method, device):
    s, t, m = two_level_batch(device=device)
    loss = build_distill_loss(method)
    half = loss([f.half() for f in s], [f.half() for f in t], m)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss([f.half().float() for f in s], [f.half().float() for f in t], m).item(),
                                        rel=1e-5, abs=1e-9)


# --------------------------------------------------------------------------- memory bound of the relational methods


@pytest.mark.parametrize("method,max_samples", [("rkd", 128), ("pkt", 512), ("rkd", 50)])
def test_relational_methods_use_at_most_max_samples_positions(method, max_samples, device):
    g = seeded(12)
    s, t = torch.randn(2, 16, 64, 64, generator=g), torch.randn(2, 16, 64, 64, generator=g)
    mask = box_mask(2, 64, 64, [(64, 64), (40, 50)])
    loss = build_distill_loss(method, max_samples=max_samples)
    assert loss.max_samples == max_samples
    assert loss.sample(s, mask).shape == (max_samples, 16)

    # The same loss on an explicit subsample, spread evenly over the batch's valid positions.
    positions = [(b, y, x) for b in range(2) for y, x in valid_positions(mask, b)]
    picked = [positions[i * len(positions) // max_samples] for i in range(max_samples)]
    student = torch.stack([s[b, :, y, x] for b, y, x in picked])
    teacher = torch.stack([t[b, :, y, x] for b, y, x in picked])
    as_map = lambda rows: rows.T.reshape(1, 16, 1, max_samples)  # noqa: E731 - one row of positions
    explicit = loss([as_map(student)], [as_map(teacher)], [torch.ones(1, 1, 1, max_samples, dtype=torch.bool)])
    assert loss([s.to(device)], [t.to(device)], [mask.to(device)]).item() == pytest.approx(explicit.item(), rel=1e-5)
