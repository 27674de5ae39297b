"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillLoss, check_levels, full_precision, masked_pool, register_loss


def gather_across_processes(*tensors: Tensor) -> list[Tensor]:
    """Each tensor from every DDP process, concatenated in rank order (the tensors themselves without DDP).

    The tensors of one process share their first size, which may differ between processes, zero
    included (ON_BAD_ENTRY "skip" drops images): all_gather needs one shape everywhere, so the
    sizes are gathered first and each part is padded to the largest, then trimmed. Every process
    must call this in every step, with or without images, or the others wait for it forever.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    world = dist.get_world_size()
    size = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=tensors[0].device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    largest = max(sizes)
    if largest == 0:  # every process agrees there is nothing to gather
        return list(tensors)
    gathered = []
    for x in tensors:
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return gathered


class MemoryBank(nn.Module):
    """One L2-normalised embedding per training image (row of the store's image index), momentum-updated.

    Float32, (num_images, dim): 118,287 COCO train2017 images x 128 x 4 bytes = 60.6 MB per bank.
    A persistent buffer, so checkpoints (and resumes) carry it.
    """

    def __init__(self, num_images: int, dim: int, momentum: float) -> None:
        super().__init__()
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("embeddings", F.normalize(torch.rand(num_images, dim).mul_(2 * stdv).add_(-stdv), dim=1))
        self.momentum = momentum

    @torch.no_grad()
    def update(self, rows: Tensor, embeddings: Tensor) -> None:
        """Move the rows towards new embeddings: normalise(m * old + (1 - m) * new)."""
        mixed = self.embeddings[rows] * self.momentum + embeddings.to(self.embeddings.dtype) * (1 - self.momentum)
        self.embeddings.index_copy_(0, rows, F.normalize(mixed, dim=1))


@register_loss("crd")
class CRDLoss(DistillLoss):
    """CRD: Contrastive Representation Distillation (Tian et al. 2020), with embedding heads and memory banks.

    Adapted to detection: an image is represented by its FPN levels each average-pooled over
    valid positions and concatenated (L x C); linear heads embed student and teacher to `dim`
    and L2-normalise. Two banks hold one embedding per training image, indexed by the image's
    row in the store's image index: the student embedding is contrasted with the teacher bank
    and the teacher embedding with the student bank, the positive being the image's own row and
    K negatives drawn uniformly from all rows. The objective is the softmax (InfoNCE) form with
    temperature 0.07 (RepDistiller's default is the NCE form, whose normalising constant is
    estimated from the first batch). Banks are updated after the loss with momentum 0.5.

    Under DDP every process gathers the batch's rows and embeddings from all processes
    (all_gather) before updating, so all processes apply the same updates and their banks stay
    identical (detectron2 trains with broadcast_buffers=False, so buffers are never re-sent).
    Processes may hold different numbers of valid images (ON_BAD_ENTRY "skip"); one with none
    joins the gather through step_without_images.
    """

    default_weight = 0.03  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    own_connectors = True
    shape_args = ("student_channels", "teacher_channels", "num_levels", "num_images")
    needs_image_index = True

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, num_images: int, dim: int = 128,
                 negatives: int = 4096, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if num_images < 2:
            raise ValueError(f"crd contrasts an image with others, so it needs >= 2 training images, got {num_images}")
        self.embed_student = nn.Linear(num_levels * student_channels, dim)
        self.embed_teacher = nn.Linear(num_levels * teacher_channels, dim)
        self.student_bank = MemoryBank(num_images, dim, momentum)
        self.teacher_bank = MemoryBank(num_images, dim, momentum)
        self.negatives = negatives
        self.temperature = temperature

    def embed(self, head: nn.Linear, levels: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        """(B, dim) normalised embedding of the masked-pooled, concatenated levels."""
        return F.normalize(head(torch.cat([masked_pool(x.float(), m) for x, m in zip(levels, masks)], dim=1)), dim=1)

    def contrast(self, anchors: Tensor, bank: MemoryBank, candidates: Tensor) -> Tensor:
        """Cross-entropy of picking column 0 (the positive) among the (B, 1 + K) candidate rows of the bank."""
        logits = torch.einsum("bd,bkd->bk", anchors, bank.embeddings[candidates]) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(anchors), dtype=torch.long, device=anchors.device))

    def forward(self, students, teachers, masks, rows: Tensor | None = None) -> Tensor:
        check_levels(students, teachers, masks)
        if rows is None or rows.shape != (students[0].shape[0],):
            raise ValueError(f"crd needs each image's row in the store's image index, one per image: got {rows!r}")
        num_images = self.student_bank.embeddings.shape[0]
        rows = rows.to(self.student_bank.embeddings.device)
        if rows.min() < 0 or rows.max() >= num_images:
            raise ValueError(f"crd got rows {rows.tolist()} outside its {num_images}-image memory bank")
        with full_precision(students[0]):
            s = self.embed(self.embed_student, students, masks)
            t = self.embed(self.embed_teacher, teachers, masks)
            noise = torch.randint(num_images, (len(rows), self.negatives), device=rows.device)
            candidates = torch.cat([rows[:, None], noise], dim=1)
            loss = self.contrast(s, self.teacher_bank, candidates) + self.contrast(t, self.student_bank, candidates)
        if self.training:
            self.update_banks(rows, s.detach(), t.detach())
        return loss

    @torch.no_grad()
    def update_banks(self, rows: Tensor, student: Tensor, teacher: Tensor) -> None:
        """Move the banks' rows of every process's images (all_gather under DDP) towards their embeddings."""
        all_rows, all_student, all_teacher = gather_across_processes(rows, student, teacher)
        if len(all_rows):
            self.student_bank.update(all_rows, all_student)
            self.teacher_bank.update(all_rows, all_teacher)

    def step_without_images(self, device: torch.device) -> None:
        """A step in which this process has no valid image still joins the other processes' bank gather."""
        if self.training:
            dim = self.student_bank.embeddings.shape[1]
            empty = torch.empty((0, dim), device=self.student_bank.embeddings.device)
            self.update_banks(torch.empty(0, dtype=torch.long, device=empty.device), empty, empty)
