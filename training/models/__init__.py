"""Multi-exit models: the contract (`MultiExitNetwork`) and a registry (`create_model`)."""
from training.models.base import MultiExitNetwork
from training.models.registry import create_model, list_families, list_models, register_model

# Importing the architecture modules registers them.
from training.models import smallcnn as _smallcnn  # noqa: F401
from training.models import resnet as _resnet  # noqa: F401
from training.models import torchvision_net as _torchvision_net  # noqa: F401

__all__ = ["MultiExitNetwork", "create_model", "list_families", "list_models", "register_model"]
