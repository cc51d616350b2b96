"""ResNet-50 (torchvision): 25.6 M parameters, 224x224 input after resize 232 and centre crop."""
from .classifier import TorchvisionClassifierSpec


class ResNet50Spec(TorchvisionClassifierSpec):
    name = "resnet50"
    builder_name = "resnet50"
    weights_enum = "ResNet50_Weights"
    channels_last_on_gpu = True
