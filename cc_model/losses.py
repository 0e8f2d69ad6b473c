"""The loss terms as small modules whose forward returns named terms (open_clip's ClipLoss habit).

L_total = L_LDM + lambda1 (L_c + L_m) + lambda2 L_loc   (Eq. 9)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cc_model.attention import CapturedMaps, normalise_map


def _float32(tensor: torch.Tensor):
    """Autocast off around a loss: the training step runs under bf16 autocast on a GPU, which would
    cast the ``.float()`` features back to bf16 for every product (``@``, einsum). A bf16 cosine is
    off by up to 2^-8; divided by a temperature of 0.07 and scaled by alpha = 1/r_ij, that is an
    error of 0.05-0.5 in a logit. The (N, N) products here cost nothing in float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _off_diagonal_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> (..., N): logsumexp over k != i of logits[..., i, k]."""
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(eye, float("-inf")).logsumexp(dim=-1)


class LDMLoss(nn.Module):
    """Eq. 1: mean squared error between the UNet's prediction and the noise (or v) target."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ldm": F.mse_loss(prediction.float(), target.float())}


class CSCLLoss(nn.Module):
    """Crossmodal semantic contrast on the CLS tokens (Eq. 4), a_ij = cos(v_i^cls, t_j^cls).

    ``form="paper"`` is Eq. 4 as printed: no temperature, and both denominators run over j != i,
    i.e. they *exclude* the positive (unlike InfoNCE). Cosines lie in [-1, 1], so each sample's
    term is at least 2 (log(N - 1) - 2), a negative number for small N. It needs N >= 2.
    ``form="infonce"`` is the standard symmetric InfoNCE: positive included, logits a / T.
    """

    def __init__(self, *, form: Literal["paper", "infonce"] = "paper", temperature: float = 0.07,
                 reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        self.form, self.temperature, self.reduction = form, temperature, reduction

    def forward(self, visual_cls: torch.Tensor, textual_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, D_v), (N, D_t) with D_v == D_t -> {"cscl": scalar}."""
        if visual_cls.shape[0] < 2:
            raise ValueError("CSCL needs at least 2 samples in the batch")
        with _float32(visual_cls):
            return {"cscl": self._loss(visual_cls, textual_cls)}

    def _loss(self, visual_cls: torch.Tensor, textual_cls: torch.Tensor) -> torch.Tensor:
        a = F.normalize(visual_cls.float(), dim=-1) @ F.normalize(textual_cls.float(), dim=-1).T  # (N, N) a[i, j]
        if self.form == "paper":
            diag = a.diagonal()
            per_sample = -(diag - _off_diagonal_logsumexp(a.T)) - (diag - _off_diagonal_logsumexp(a))
        else:
            logits = a / self.temperature
            labels = torch.arange(a.shape[0], device=a.device)
            per_sample = F.cross_entropy(logits.T, labels, reduction="none") + F.cross_entropy(
                logits, labels, reduction="none"
            )
        return _reduce(per_sample, self.reduction)


class MACLLoss(nn.Module):
    """Multiscale appearance contrast on the S+ tokens, one term per cross-attention layer (Eq. 7).

    L_m^i = -sum_a log( exp(alpha_ij cos_ij^a / tau) / sum_{k != i} exp(alpha_ik cos_ik^a / tau) )
    with j the positive of i, alpha_ij = 1 / r_ij and r_ij the appearance similarity of the
    segmented subjects, clamped to [r_min, 1] first (random or poor encoders give r <= 0).
    The printed Eq. 7 misplaces a parenthesis in the denominator ("exp(alpha cos) / tau"); we apply
    tau inside the exponential in both places. It also sums a = 0..l, one more than the l S+
    tokens; we sum over the l tokens. The denominator includes the positive j (k != i only).
    """

    def __init__(self, *, temperature: float = 0.07, r_min: float = 0.1, reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        self.temperature, self.r_min, self.reduction = temperature, r_min, reduction

    def forward(
        self, tokens: torch.Tensor, positive_index: torch.Tensor, appearance_sim: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """tokens (N, l, D), positive_index (N,) long, appearance_sim (N, N) r_ij -> {"macl": scalar}."""
        with _float32(tokens):
            return {"macl": self._loss(tokens, positive_index, appearance_sim)}

    def _loss(self, tokens: torch.Tensor, positive_index: torch.Tensor,
                    appearance_sim: torch.Tensor) -> torch.Tensor:
        z = F.normalize(tokens.float(), dim=-1)
        cos = torch.einsum("ild,kld->lik", z, z)  # (l, N, N) cos[a, i, k]
        alpha = 1.0 / appearance_sim.float().clamp(self.r_min, 1.0)  # (N, N)
        logits = alpha.unsqueeze(0) * cos / self.temperature  # (l, N, N)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        positive = logits[:, rows, positive_index]  # (l, N)
        per_layer = -(positive - _off_diagonal_logsumexp(logits))  # (l, N)
        return _reduce(per_layer.sum(dim=0), self.reduction)


class LocalisationLoss(nn.Module):
    """FastComposer's localisation loss on the averaged attention map A_g (Sec. 3.4).

    L_loc = mean(A_g * (1 - M_g)) - mean(A_g * M_g): attention on the background is penalised and on
    the subject rewarded. The paper's printed Eq. 8, mean((1 - M)(1 - A)) - mean(M A), has a
    sign/complement typo: its first term would *reward* background attention.

    A_g at each layer resolution is the mean of the layers' maps there: per layer, the visual map
    (the mean of its m max-normalised per-token maps) and the placeholder's text map (max-
    normalised); M_g is the mask area-resized to that resolution. Resolutions are averaged.
    """

    def forward(
        self, maps: Sequence[CapturedMaps], mask: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """maps from AttentionCapture, mask (B, 1, H, W) in [0, 1], sample_weight (B,) -> {"loc": scalar}."""
        if not maps:
            raise ValueError("localisation loss: no attention maps captured (check model.loc_min_downsample)")
        by_grid: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
        for layer in maps:
            if layer.visual is not None:
                by_grid[layer.height, layer.width].append(normalise_map(layer.visual.float()).mean(dim=1))
            if layer.text is not None:
                by_grid[layer.height, layer.width].append(normalise_map(layer.text.float()))
        weight = torch.ones(mask.shape[0], device=mask.device) if sample_weight is None else sample_weight.float()
        losses = []
        for (h, w), layer_maps in sorted(by_grid.items()):
            a_g = torch.stack(layer_maps).mean(dim=0)  # (B, h, w)
            m_g = F.adaptive_avg_pool2d(mask.float(), (h, w))[:, 0]  # (B, h, w)
            per_sample = (a_g * (1 - m_g)).mean(dim=(1, 2)) - (a_g * m_g).mean(dim=(1, 2))  # (B,)
            losses.append((weight * per_sample).sum() / weight.sum().clamp_min(1.0))
        return {"loc": torch.stack(losses).mean()}


class TotalLoss(nn.Module):
    """Eq. 9 over whichever terms are present (ablations switch terms off)."""

    def __init__(self, *, lambda1: float, lambda2: float):
        super().__init__()
        self.lambda1, self.lambda2 = lambda1, lambda2

    def forward(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        zero = terms["ldm"].new_zeros(())
        return (
            terms["ldm"]
            + self.lambda1 * (terms.get("cscl", zero) + terms.get("macl", zero))
            + self.lambda2 * terms.get("loc", zero)
        )


__all__ = ["CSCLLoss", "LDMLoss", "LocalisationLoss", "MACLLoss", "TotalLoss"]
