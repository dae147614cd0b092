"""Batched Grad-CAM (Selvaraju et al. 2017) for any medattn model, published or differentiable.

Grad-CAM of class c at a layer with activations A (B, K, h, w):

    alpha_k = mean_{x,y} d y_c / d A_k(x, y)          y_c = the logit of class c
    cam     = ReLU(sum_k alpha_k A_k)
    cam     = (cam - min cam) / (max cam + eps)      per image, as pytorch-grad-cam's scale_cam_image
    cam     -> bilinear resize to the input size     (cv2.resize in pytorch-grad-cam)

The whole batch is done at once on the device: the gradient of the *sum* of the per-sample
target logits gives every sample its own d y_c(i) / d A(i), because nothing after the layer mixes
samples. (One exception: a BatchNorm in training mode after the layer couples the samples of
a batch through its batch statistics, by a term of order 1/B; in evaluation mode the batched
map equals the per-sample map exactly. ResNet's layer4[-1] has nothing after it but pooling and
the head; see docs/methods/gradcam_loss.md.)

``create_graph=True`` keeps the map differentiable with respect to the network's parameters
(a double backward), which is what a loss on the map needs; ``False`` gives a constant map, as
the published code's NumPy maps are.

Example:
    >>> cam, logits = gradcam(model, x, target=labels)            # doctest: +SKIP
    >>> cam.shape                                                  # (B, H, W) in [0, 1]
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medattn.boxes import source_to_view, xywh_to_xyxy
from medattn.errors import ConfigError

EPS = 1e-7  # pytorch-grad-cam's scale_cam_image adds 1e-7 to the maximum


def find_layer(model: nn.Module, name: str = "") -> nn.Module:
    """The Grad-CAM target module of ``model``.

    Args:
        model: a medattn model (``gradcam_layer()``) or any module.
        name: ``""`` for the model's default (VGG: the last conv; ResNet: ``layer4[-1]``), or a
            dotted submodule name such as ``layer4.1`` or ``features.40``.

    Raises:
        ConfigError: no such submodule (the message lists the top-level children).
    """
    if not name:
        if not hasattr(model, "gradcam_layer"):
            raise ConfigError(f"gradcam_loss.layer: {type(model).__name__} has no default Grad-CAM layer; "
                              "name one (a dotted submodule name)")
        return model.gradcam_layer()
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"gradcam_loss.layer={name!r}: the model has no such submodule "
                          f"(top level: {children})") from None


@contextlib.contextmanager
def capture(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``layer``'s forward output (the activation A) while the block runs.

    Yields a dict whose ``"A"`` entry is set by the forward pass. The hook is removed on exit.
    """
    store: dict[str, Any] = {}

    def hook(_m, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"Grad-CAM layer {type(_m).__name__} returns {type(out).__name__}, not a tensor")
        store["A"] = out

    h = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        h.remove()


def cam_from_activations(activations: torch.Tensor, scores: torch.Tensor, *, create_graph: bool = False,
                         size: tuple[int, int] | None = None, retain_graph: bool = True) -> torch.Tensor:
    """Grad-CAM maps from a layer's activations and the per-sample target scores.

    Args:
        activations: (B, K, h, w), part of the graph that produced ``scores``.
        scores: (B,) the target logit of each sample (y_c(i)).
        create_graph: keep the map differentiable (double backward).
        size: (H, W) to resize to (the input size), or None for the layer's resolution.
        retain_graph: keep the forward graph for a later backward (the training loss).

    Returns:
        (B, H, W) float32 maps in [0, 1].
    """
    if activations.ndim != 4:
        raise ValueError(f"Grad-CAM needs (B, K, h, w) activations, got {tuple(activations.shape)}")
    (grads,) = torch.autograd.grad(scores.sum(), activations, create_graph=create_graph,
                                   retain_graph=retain_graph or create_graph)
    a = activations.float()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1))  # (B, h, w)
    lo = cam.flatten(1).amin(1).view(-1, 1, 1)
    cam = cam - lo
    hi = cam.flatten(1).amax(1).view(-1, 1, 1)
    cam = cam / (hi + EPS)
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    if not create_graph:
        cam = cam.detach()
    return cam


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, *, layer: str | nn.Module = "",
            create_graph: bool = False, size: tuple[int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``x`` through ``model`` and return (Grad-CAM maps, logits).

    Args:
        model: the classifier (its current train/eval mode is used as is).
        x: (B, C, H, W) input.
        target: (B,) class index per sample; None = the predicted class (argmax), as the
            published code does.
        layer: a module, or a name for :func:`find_layer`.
        create_graph: differentiable maps (for a loss); False = constant maps.
        size: output (H, W); default the input size.

    Returns:
        cam (B, H, W) in [0, 1] and the logits (B, L) of the same forward pass.
    """
    mod = layer if isinstance(layer, nn.Module) else find_layer(model, layer)
    with torch.enable_grad():
        with capture(mod) as store:
            logits = model(x)
        if "A" not in store:
            raise ConfigError(f"the Grad-CAM layer {type(mod).__name__} was not run by the model's forward")
        tgt = logits.argmax(1) if target is None else target.to(logits.device).long()
        scores = logits.gather(1, tgt.view(-1, 1)).squeeze(1)
        cam = cam_from_activations(store["A"], scores, create_graph=create_graph,
                                   size=size or tuple(x.shape[-2:]))
    return cam, logits


# ---------------------------------------------------------------------------------------------
# Target regions (seed 002): the lung box -> where the disease should be attended
# ---------------------------------------------------------------------------------------------
# Region kinds (codes used in tensors). "lower"/"upper" halves of the lung box (effusion,
# pneumothorax), "outside" = the complement of the lungs-to-bottom band (subcutaneous emphysema),
# "lung" = the whole lung box.
REGIONS = ("none", "lower", "upper", "outside", "lung")
REGION_CODE = {name: i for i, name in enumerate(REGIONS)}


def lung_box_in_view(lung_box: torch.Tensor, window: torch.Tensor | None = None,
                     flip: torch.Tensor | None = None) -> torch.Tensor:
    """Lung boxes of the prepared image -> normalised [x0, y0, x1, y1] in the network's input view.

    Args:
        lung_box: (B, 4) normalised [x, y, w, h] in the prepared image; NaN rows = unknown, which
            become the whole view (the published code's fallback when no lung contour is found).
        window: (B, 4) the view's window [x0, y0, x1, y1] in the *unflipped* prepared image
            (the loaders' ``window``); None = the whole image.
        flip: (B,) bool, the view is mirrored horizontally.

    Returns:
        (B, 4) float boxes clamped to [0, 1].
    """
    b = lung_box.float()
    out = source_to_view(xywh_to_xyxy(b), window, flip).clamp(0, 1)
    unknown = torch.isnan(b).any(1)
    whole = torch.zeros_like(out)
    whole[:, 2:].fill_(1.0)  # [0, 0, 1, 1], made on the device (torch.tensor([...]) would be a host copy)
    return torch.where(unknown.view(-1, 1), whole, out)


def region_masks(boxes: torch.Tensor, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel masks of the target regions, as the published code cuts them.

    With the box in pixels (x0, y0, x1, y1) and mid = round(y0 + (y1 - y0) / 2):
    lower = rows [mid, y1) x cols [x0, x1); upper = rows [y0, mid) x cols [x0, x1);
    outside = everything except rows [y0, H) x cols [x0, x1); lung = rows [y0, y1) x cols [x0, x1).

    Args:
        boxes: (B, 4) normalised [x0, y0, x1, y1] in the view (:func:`lung_box_in_view`).
        codes: (B,) int region codes (:data:`REGION_CODE`; 0 = no region).
        height, width: the map size.

    Returns:
        (B, H, W) float masks (1 inside the region).
    """
    dev = boxes.device
    px0 = torch.round(boxes[:, 0] * width).view(-1, 1, 1)
    px1 = torch.round(boxes[:, 2] * width).view(-1, 1, 1)
    py0 = torch.round(boxes[:, 1] * height).view(-1, 1, 1)
    py1 = torch.round(boxes[:, 3] * height).view(-1, 1, 1)
    mid = torch.floor(py0 + (py1 - py0) / 2 + 0.5)
    rows = torch.arange(height, device=dev, dtype=boxes.dtype).view(1, -1, 1)
    cols = torch.arange(width, device=dev, dtype=boxes.dtype).view(1, 1, -1)
    in_cols = (cols >= px0) & (cols < px1)
    lower = (rows >= mid) & (rows < py1) & in_cols
    upper = (rows >= py0) & (rows < mid) & in_cols
    outside = ~((rows >= py0) & in_cols)
    lung = (rows >= py0) & (rows < py1) & in_cols
    c = codes.view(-1, 1, 1).to(dev)
    m = torch.zeros(boxes.shape[0], height, width, dtype=torch.bool, device=dev)
    for code, mask in ((1, lower), (2, upper), (3, outside), (4, lung)):
        m = m | ((c == code) & mask)
    return m.float()


def region_ratio(cam: torch.Tensor, region: torch.Tensor, thresh: float, temperature: float | None = None
                 ) -> torch.Tensor:
    """r = share of region pixels whose map value exceeds ``thresh``.

    Args:
        cam: (B, H, W) maps in [0, 1].
        region: (B, H, W) 0/1 masks.
        thresh: the threshold (seed 002 default 0.3).
        temperature: None = the published hard count (no gradient); T > 0 = the soft count
            sigmoid((cam - thresh) / T), differentiable through ``cam``.

    Returns:
        (B,) ratios; 0 where the region is empty.
    """
    hit = (cam > thresh).float() if temperature is None else torch.sigmoid((cam - thresh) / temperature)
    area = region.flatten(1).sum(1)
    return (hit * region).flatten(1).sum(1) / area.clamp_min(1.0)
