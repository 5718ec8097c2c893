"""The model zoo: models as ordered sequences of blocks.

``build_model(name, **config)`` builds a registered model; ``model_names()`` lists
them. Importing this package registers the zoo (``cnn``, ``resnet18``).
"""

from testbed.models.blocks import BasicBlock, BlockModel, build_model, model_names, register_model
from testbed.models.cnn import SmallCNN
from testbed.models.resnet import ResNet18
from testbed.models.weights import load_weights, read_weights_info, save_weights, state_hash

__all__ = [
    "BasicBlock",
    "BlockModel",
    "ResNet18",
    "SmallCNN",
    "build_model",
    "load_weights",
    "model_names",
    "read_weights_info",
    "register_model",
    "save_weights",
    "state_hash",
]
