"""Factor transfer (Kim, Park & Kwak, NeurIPS 2018)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DistillLoss, masked_mean, register_loss, zero_padding


class MaskedConvStack(nn.Module):
    """3x3 convolutions with LeakyReLU(0.1), padding re-zeroed after each, so a padded image maps like the image alone."""

    def __init__(self, widths: Sequence[int], last_activation: bool = True) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.last_activation = last_activation

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = zero_padding(x, mask)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.last_activation or i < len(self.convs) - 1:
                x = F.leaky_relu(x, 0.1)
            x = zero_padding(x, mask)
        return x


class Paraphraser(nn.Module):
    """FT's autoencoder on teacher features: the encoder's output is the teacher factor."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = MaskedConvStack([channels, channels, factor_channels, factor_channels])
        # No activation at the end: FPN features are signed, and the decoder reconstructs them.
        self.decoder = MaskedConvStack([factor_channels, factor_channels, channels, channels], last_activation=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(self.encoder(x, mask), mask)


def normalised_factor(factor: Tensor, mask: Tensor) -> Tensor:
    """Each image's factor (valid positions x channels, padding 0) divided by its L2 norm."""
    factor = zero_padding(factor, mask)
    return factor / factor.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


@register_loss("factor")
class FactorTransferLoss(DistillLoss):
    """FT: Paraphrasing Complex Network (Kim et al. 2018), factor transfer through paraphraser and translator.

    Adapted to detection: one paraphraser and one translator shared by all FPN levels (the levels
    share their width, as FPN's heads are shared), built of 3x3 convs and LeakyReLU as
    RepDistiller's, without BatchNorm (its batch statistics would count padding) and with padding
    re-zeroed after every conv. Factors have k = 0.5 times the teacher's width. The loss is the
    L1 distance (p = 1) between the student's and teacher's factors, each L2-normalised per image
    over its valid positions, averaged over valid positions and factor channels, then over levels.

    Init stage ("teacher"): the paraphraser is trained to reconstruct teacher features (masked
    MSE) for DISTILL.INIT_ITERS iterations before training. It needs teacher features only, so
    from a store no teacher runs. During training the paraphraser is fixed (the teacher factor
    is computed without gradient) and the translator trains with the student.
    """

    default_weight = 40.0  # B that starts loss_kd near 0.5 on the embedded default (tools/measure_weights.py)

    own_connectors = True
    shape_args = ("student_channels", "teacher_channels")
    init_stage = "teacher"

    def __init__(self, student_channels: int, teacher_channels: int, factor_rate: float = 0.5) -> None:
        super().__init__()
        factor_channels = max(1, int(round(teacher_channels * factor_rate)))
        self.paraphraser = Paraphraser(teacher_channels, factor_channels)
        # Trained only by the init stage: frozen for the main training (out of its optimizer, and
        # DDP would otherwise wait for gradients that never come).
        self.paraphraser.requires_grad_(False)
        self.translator = MaskedConvStack([student_channels, student_channels, factor_channels, factor_channels])

    def level_loss(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_factor = normalised_factor(self.paraphraser.encoder(teacher, mask), mask)
        student_factor = normalised_factor(self.translator(student, mask), mask)
        return masked_mean((student_factor - teacher_factor).abs(), mask)

    def init_loss(self, students, teachers, masks) -> Tensor:
        targets = [zero_padding(t.float(), m) for t, m in zip(teachers, masks)]  # NaN padding: no NaN gradient
        losses = [masked_mean((self.paraphraser(t, m) - t).pow(2), m) for t, m in zip(targets, masks)]
        return torch.stack(losses).mean()

    def init_parameters(self) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

