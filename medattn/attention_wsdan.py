"""WS-DAN / CAL attention ops (DualAttendMed, seed 000): bilinear attention pooling, the choice
of one attention map per image, attention crop and attention drop, and the losses on the maps.

Facts follow methods.md section 000 (DualAttendMed ``models/cal.py``, ``utils.py``; upstream CAL
``fgvc/``). Everything is batched on the tensors' device; there is no Python loop over the
batch or over pairs of maps, and no host synchronisation.

Finite by construction, without changing what the network learns:

* the sampling weights of the maps are ``sqrt(relu(sum_hw A_k) + eps)``. The published
  ``sqrt(sum_hw A_k + eps)`` is NaN for a map with a negative sum (DualAttendMed's attention
  conv has no ReLU), and ``np.random.choice`` then raises; the ReLU makes such a map
  (almost) never chosen, and all-negative maps give uniform weights;
* the crop threshold is taken on ``relu`` of the upsampled map: whenever the map has a positive
  maximum the mask is exactly the published ``A >= theta * max(A)``; a map with no positive
  value (where the published mask is empty and ``.min()`` of an empty tensor raises) crops the
  whole image;
* the drop keeps the whole image when the map has no positive value (the published rule
  already keeps everything for a negative maximum; for an all-zero map it would black out
  the whole image).

The maps themselves (and so the pooled features and every loss) are never clamped.

Box convention as :mod:`medattn.attention`: ``[x0, y0, x1, y1]`` on pixel edges, normalised by
the image width/height.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medattn.boxes import normalize

EPS = 1e-6  # inside the signed square root (CAL's EPSILON) and the sampling weights


# --------------------------------------------------------------------------------------------
# Bilinear attention pooling
# --------------------------------------------------------------------------------------------
def bilinear_attention_pooling(features: torch.Tensor, maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """BAP: X[b, m, c] = mean_{h,w} A[b, m, h, w] * F[b, c, h, w], signed sqrt, L2 norm.

    Args:
        features: (B, C, H, W) feature map F (after channel attention).
        maps: (B, M, h, w) attention maps; bilinearly resized to (H, W) when they differ.
        eps: added under the square root: sign(x) * sqrt(|x| + eps).

    Returns:
        (B, M*C) float32 feature matrix, L2-normalised over all M*C entries (row m, column c at
        position m*C + c).
    """
    b, c, h, w = features.shape
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
    x = torch.einsum("bmhw,bchw->bmc", maps, features) / float(h * w)
    x = x.reshape(b, -1).float()
    x = torch.sign(x) * torch.sqrt(x.abs() + eps)
    return F.normalize(x, dim=-1)


def counterfactual_maps(maps: torch.Tensor, training: bool) -> torch.Tensor:
    """CAL's counterfactual attention: U(0, 2) per element in training, all ones in evaluation."""
    if training:
        return torch.empty_like(maps).uniform_(0.0, 2.0)
    return torch.ones_like(maps)


# --------------------------------------------------------------------------------------------
# Choosing the map that augments each image
# --------------------------------------------------------------------------------------------
def sampling_weights(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(B, M, h, w) -> (B, M) weights sqrt(relu(sum_hw A_k) + eps), L1-normalised per image.

    NaN-free version of the published sqrt(sum_hw A_k + eps) (see the module docstring).
    """
    s = maps.detach().float().sum(dim=(2, 3))
    w = torch.sqrt(s.clamp_min(0.0) + eps)
    return w / w.sum(dim=1, keepdim=True)


def sample_maps(maps: torch.Tensor, k: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick ``k`` maps per image with probability proportional to :func:`sampling_weights`,
    **with replacement** (``np.random.choice(M, 2, p=w)`` as published; both picks can be the
    same map). Returns (B, k, h, w): channel 0 crops, channel 1 drops."""
    idx = torch.multinomial(sampling_weights(maps), k, replacement=True, generator=generator)
    return torch.gather(maps.detach(), 1, idx[:, :, None, None].expand(-1, -1, *maps.shape[-2:]))


def draw_theta(theta: float | tuple[float, float], n: int, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image thresholds: a fixed value, or U(lo, hi) drawn per image (CAL)."""
    if isinstance(theta, (tuple, list)):
        lo, hi = float(theta[0]), float(theta[1])
        return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)
    return torch.full((n,), float(theta), device=device)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # CAL uses F.upsample_bilinear (align_corners=True): the low-resolution samples sit on the
    # image grid's corners, so the upsampled maximum equals the map's maximum.
    return F.interpolate(maps.float().unsqueeze(1), size=size, mode="bilinear", align_corners=True).squeeze(1)


def crop_boxes(maps: torch.Tensor, theta: float | tuple[float, float] | torch.Tensor, padding: float,
               size: tuple[int, int] | int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-crop box of each image: the box of **all** pixels of the map (upsampled to the
    image) with A >= theta * max(A), padded by padding*H and padding*W, clipped to the image.

    Args:
        maps: (B, h, w) one map per image.
        theta: a float, a (lo, hi) range drawn per image, or a (B,) tensor.
        padding: CAL's padding_ratio (0.1 in training; 0.1 or 0.05 at test).
        size: image size (H, W) (or S) the map is upsampled to.

    Returns:
        boxes (B, 4) normalised [x0, y0, x1, y1]; empty (B,) bool, True where the map has no
        positive value (the box is then the whole image).

    Pixel (r, c) covers [c, c+1] x [r, r+1]: a mask spanning rows r0..r1 gives y in [r0, r1 + 1].
    (CAL slices [min - pad : max + pad], which drops the last mask row/column when pad = 0.)
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    H, W = hw
    b = maps.shape[0]
    th = theta.to(maps.device).float() if isinstance(theta, torch.Tensor) else draw_theta(
        theta, b, maps.device, generator)
    up = _upsample(maps.detach(), hw).clamp_min(0.0)
    mx = up.flatten(1).amax(dim=1)
    empty = mx <= 0
    mask = up >= (th * mx).view(-1, 1, 1)  # all True where mx == 0: the whole image
    rows = mask.any(dim=2)  # (B, H)
    cols = mask.any(dim=1)  # (B, W)
    ar_h = torch.arange(H, device=maps.device)
    ar_w = torch.arange(W, device=maps.device)
    big = torch.iinfo(torch.long).max
    r0 = torch.where(rows, ar_h, big).amin(dim=1)
    r1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    c0 = torch.where(cols, ar_w, big).amin(dim=1)
    c1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    y0 = (r0.float() - padding * H).clamp(0, H)
    y1 = (r1.float() + padding * H).clamp(0, H)
    x0 = (c0.float() - padding * W).clamp(0, W)
    x1 = (c1.float() + padding * W).clamp(0, W)
    return normalize(torch.stack([x0, y0, x1, y1], dim=1), H, W), empty


def drop_masks(maps: torch.Tensor, theta: float | tuple[float, float] | torch.Tensor, size: tuple[int, int] | int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Attention-drop keep-masks: 1 where the upsampled map is < theta * max(A), 0 elsewhere.

    Args:
        maps: (B, h, w) one map per image.
        theta: a float, a (lo, hi) range drawn per image, or a (B,) tensor.
        size: image size (H, W) or S.

    Returns:
        (B, 1, H, W) float mask; all ones for a map without a positive value.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    b = maps.shape[0]
    th = theta.to(maps.device).float() if isinstance(theta, torch.Tensor) else draw_theta(
        theta, b, maps.device, generator)
    m = maps.detach().float()
    mx = m.flatten(1).amax(dim=1)
    up = _upsample(m, hw)
    keep = (up < (th * mx).view(-1, 1, 1)) | (mx <= 0).view(-1, 1, 1)
    return keep.unsqueeze(1).float()


# --------------------------------------------------------------------------------------------
# Losses on the attention maps
# --------------------------------------------------------------------------------------------
def _pair_mean(gram: torch.Tensor) -> torch.Tensor:
    """Mean over b and over the pairs i < j of a (B, M, M) matrix; 0 when M < 2."""
    m = gram.shape[-1]
    if m < 2:
        return gram.sum() * 0.0
    iu = torch.triu_indices(m, m, offset=1, device=gram.device)
    return gram[:, iu[0], iu[1]].mean()


def alignment_loss_published(maps: torch.Tensor) -> torch.Tensor:
    """DualAttendMed's "attention alignment" loss: MSE(A, mean_m A), a mean over B*M*H*W.

    It pulls the M maps towards their common mean (it aligns them with nothing else)."""
    a = maps.float()
    return F.mse_loss(a, a.mean(dim=1, keepdim=True).expand_as(a))


def diversity_loss_published(maps: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """DualAttendMed's "diversity" loss: mean_b mean_{i<j} relu(margin - ||A_i * A_j||_F^2).

    ||A_i * A_j||_F^2 = sum_hw A_i^2 A_j^2 = <A_i^2, A_j^2>, so all pairs come from one batched
    Gram matrix of the squared maps (the published code loops over b and the 496 pairs).
    The term is zero once every pair overlaps by at least ``margin``: it **rewards overlap**.
    """
    a2 = maps.float().square().flatten(2)
    overlap = a2 @ a2.transpose(1, 2)
    return _pair_mean(F.relu(margin - overlap))


def diversity_loss_corrected(maps: torch.Tensor, margin: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """An overlap penalty: mean_b mean_{i<j} relu(cos(A_i, A_j) - margin).

    cos is the cosine similarity of the flattened maps (in [0, 1] for the non-negative maps of
    the corrected variant), so the term is scale-free, bounded, and falls as the maps separate.
    """
    a = maps.float().flatten(2)
    a = a / (a.norm(dim=2, keepdim=True) + eps)
    return _pair_mean(F.relu(a @ a.transpose(1, 2) - margin))
