"""Self-supervised knowledge distillation using singular value decomposition (Lee, Kim & Song, ECCV 2018)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DistillLoss, check_levels, full_precision, register_loss, valid_vectors

# The student keeps this many singular vectors more than the teacher, so the one matching
# each teacher vector is found even when their order differs (RepDistiller's k + 3).
_EXTRA_STUDENT_VECTORS = 3
# Eigenvalue gaps below this fraction of the largest eigenvalue count as degenerate: the
# singular vectors' derivative divides by the gap, so such pairs give no gradient.
_RELATIVE_GAP_FLOOR = 1e-6
# The RBF kernel's width, exp(-d^2 / 8), from the paper.
_RBF_SCALE = 8.0


class _TopRightSingularVectors(torch.autograd.Function):
    """Top right singular vectors of X (n, C) from the eigenvectors of X^T X.

    torch.linalg.svd's backward divides by s_i^2 - s_j^2 over all pairs, including pairs the
    loss does not use: repeated singular values (a zero map, fewer positions than channels)
    give 0/0 = NaN in the whole gradient. This backward uses only the returned vectors' own
    gaps and drops the degenerate ones.
    """

    @staticmethod
    def forward(ctx, x: Tensor, count: int) -> tuple[Tensor, Tensor]:
        eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
        ctx.save_for_backward(x, eigenvalues, eigenvectors)
        ctx.count = count
        singular_values = eigenvalues[:count].clamp_min(0).sqrt()
        ctx.mark_non_differentiable(singular_values)
        return eigenvectors[:, :count].clone(), singular_values

    @staticmethod
    def backward(ctx, grad_vectors: Tensor, _grad_singular_values: Tensor) -> tuple[Tensor, None]:
        x, eigenvalues, eigenvectors = ctx.saved_tensors
        # dv_i = sum_{j != i} v_j (v_j^T dG v_i) / (l_i - l_j) for G = X^T X, so with
        # c[j, i] = (v_j . g_i) / (l_i - l_j):  dL/dG = V c V_top^T,  dL/dX = X (dL/dG + its transpose).
        gaps = eigenvalues[: ctx.count][None, :] - eigenvalues[:, None]  # [j, i] = l_i - l_j
        floor = _RELATIVE_GAP_FLOOR * eigenvalues[0].abs().clamp_min(torch.finfo(x.dtype).tiny)
        separated = gaps.abs() > floor  # also False on j == i
        inverse_gaps = torch.where(separated, 1 / torch.where(separated, gaps, 1), 0)
        coefficients = (eigenvectors.T @ grad_vectors) * inverse_gaps
        grad_gram = eigenvectors @ coefficients @ eigenvectors[:, : ctx.count].T
        return x @ (grad_gram + grad_gram.T), None


def top_right_singular_vectors(x: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The `count` leading right singular vectors (C, count) and singular values (count,) of x (n, C).

    Differentiable in the vectors (not the values), with finite gradients on degenerate x.
    """
    return _TopRightSingularVectors.apply(x, count)


def canonical_sign(vectors: Tensor) -> Tensor:
    """Flip each column so its largest-magnitude entry is positive.

    A singular vector's sign is arbitrary (LAPACK's choice can differ between devices and
    between two nearly equal inputs); the cross-level RBF depends on the relative sign of
    two levels, so the teacher's sign is fixed by the data instead.
    """
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[largest, torch.arange(vectors.shape[1], device=vectors.device)])
    return vectors * torch.where(signs == 0, 1, signs)


def align_to_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """For each teacher vector (column), the student vector with the largest |cosine|, sign-matched.

    student (C, m), teacher (C, k) -> (C, k).
    """
    cosines = student.T @ teacher  # (m, k)
    best = cosines.abs().argmax(dim=0)
    signs = torch.sign(cosines[best, torch.arange(teacher.shape[1], device=teacher.device)])
    return student[:, best] * torch.where(signs == 0, 1, signs)


def level_pair_rbf(finer: Tensor, coarser: Tensor) -> Tensor:
    """exp(-(coarser[c] - finer[c'])^2 / 8) for every channel pair and vector: (C_coarse, C_fine, k)."""
    return torch.exp(-(coarser[:, None, :] - finer[None, :, :]).pow(2) / _RBF_SCALE)


@register_loss("kdsvd")
class KDSVDLoss(DistillLoss):
    """KD-SVD: Self-supervised KD using singular value decomposition (Lee, Kim & Song, ECCV 2018).

    Per image and level, the feature map is a matrix of positions x channels; its leading
    right singular vectors (k for the teacher, k+3 for the student, the student's aligned to
    the teacher's by |cosine| and sign) are weighted by the teacher's normalised singular
    values, and consecutive levels are related by an RBF between their vectors' entries,
    a (C_coarse, C_fine, k) map. The loss is the squared difference of the student's and
    teacher's maps, summed, averaged over images and over consecutive level pairs.

    Adapted to detection: the consecutive layers are consecutive FPN levels (p2-p3, p3-p4,
    ...). The right singular vectors live in channel space, so levels of different H, W are
    related without pooling; the matrix rows are the image's valid positions only (zero rows
    would not change the vectors; anything else in padding would), and non-square maps need
    no special case. The teacher's sign is fixed by canonical_sign; gradients come from a
    guarded backward (see _TopRightSingularVectors). Level pairs are averaged, not summed
    as in RepDistiller, to keep the scale of the other methods (a factor of levels - 1).
    Student and teacher need the same width at each level (the RBF maps must match).
    """

    default_weight = 2.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"kdsvd needs k >= 1 singular vectors per level (the paper uses 1), got k={k}")
        self.k = k

    def forward(self, students: Sequence[Tensor], teachers: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        check_levels(students, teachers, masks)
        if len(students) < 2:
            raise ValueError(
                f"kdsvd relates consecutive FPN levels, so it needs at least 2 levels, got {len(students)}"
            )
        for level, (student, teacher) in enumerate(zip(students, teachers)):
            if student.shape[1] != teacher.shape[1]:
                raise ValueError(
                    f"kdsvd level {level}: student and teacher need the same channel count (their RBF maps "
                    f"are compared entry by entry), got student {student.shape[1]} and teacher "
                    f"{teacher.shape[1]}; put a 1x1 connector in front of the student"
                )
        with full_precision(students[0]):
            # float64: X^T X squares the condition number, and p2 sums ~54k positions.
            teacher_bases = [self._teacher_basis(t.double(), m) for t, m in zip(teachers, masks)]
            student_vectors = [
                self._student_directions(s.double(), m, basis) for s, m, basis in zip(students, masks, teacher_bases)
            ]
            teacher_vectors = [[vectors * weights for vectors, weights in basis] for basis in teacher_bases]
            pair_losses = []
            for level in range(1, len(students)):
                s_finer, s_coarser = self._common_width(student_vectors[level - 1], student_vectors[level])
                t_finer, t_coarser = self._common_width(teacher_vectors[level - 1], teacher_vectors[level])
                per_image = [
                    (level_pair_rbf(sf, sc) - level_pair_rbf(tf, tc)).pow(2).sum()
                    for sf, sc, tf, tc in zip(s_finer, s_coarser, t_finer, t_coarser)
                ]
                pair_losses.append(torch.stack(per_image).mean())
        return torch.stack(pair_losses).mean().float()

    @staticmethod
    def _common_width(finer: list[Tensor], coarser: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Trim both levels to the same number of vectors (fewer exist when positions < k)."""
        widths = [min(f.shape[1], c.shape[1]) for f, c in zip(finer, coarser)]
        return [f[:, :w] for f, w in zip(finer, widths)], [c[:, :w] for c, w in zip(coarser, widths)]

    @staticmethod
    def _vector_count(x: Tensor, wanted: int) -> int:
        """How many singular vectors x (n, C) has to offer, at most `wanted`."""
        return max(1, min(wanted, *x.shape))

    def _teacher_basis(self, teacher: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per image, the teacher's k leading vectors, sign-fixed (C, k), and their weights (k,)."""
        with torch.no_grad():
            basis = []
            for x in valid_vectors(teacher, mask):
                vectors, values = top_right_singular_vectors(x, self._vector_count(x, self.k))
                basis.append((canonical_sign(vectors), F.normalize(values, dim=0)))
            return basis

    def _student_directions(
        self, student: Tensor, mask: Tensor, teacher_basis: list[tuple[Tensor, Tensor]]
    ) -> list[Tensor]:
        """Per image, the student's vectors aligned to the teacher's and weighted as the teacher's: (C, k)."""
        directions = []
        for x, (teacher_vectors, teacher_weights) in zip(valid_vectors(student, mask), teacher_basis):
            candidates, _ = top_right_singular_vectors(x, self._vector_count(x, self.k + _EXTRA_STUDENT_VECTORS))
            directions.append(align_to_teacher(candidates, teacher_vectors) * teacher_weights)
        return directions
