"""Models: the :class:`ClassifierModel` contract, the backbone registry, weights, AG-CNN, WS-DAN.

    >>> from medattn.models import create_model, list_models
    >>> "resnet50" in list_models()  # the registered backbones (medattn.models.factory)
    True
    >>> model = create_model("resnet50", num_classes=15, in_chans=1, weights="imagenet")  # doctest: +SKIP

``weights="imagenet"`` reads torchvision's file from the local cache and never downloads
(``medattn weights fetch resnet50`` on a machine with internet; see :mod:`medattn.models.weights`).
"""
from medattn.models.agcnn import AGCNN, build_agcnn
from medattn.models.base import ClassifierModel, GlobalPool2d
from medattn.models.factory import check_backbone, create_model, is_model, list_models
from medattn.models.registry import register_model
from medattn.models.weights import load_state_dict_file, load_weights
from medattn.models.wsdan import WSDAN, build_wsdan

__all__ = [
    "AGCNN", "ClassifierModel", "GlobalPool2d", "build_agcnn", "check_backbone", "create_model", "is_model",
    "list_models", "load_state_dict_file", "load_weights", "register_model", "WSDAN", "build_wsdan",
]
