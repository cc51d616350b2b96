"""ViT-B/16 (torchvision): 86.6 M parameters, 224x224 input after resize 256 and centre crop.

Same pipeline as ResNet-50 (the weights' own transforms, softmax, top-k); only the architecture
differs. Attention makes its per-sample memory and compute grow faster than ResNet-50's.
"""
from .classifier import TorchvisionClassifierSpec


class ViTB16Spec(TorchvisionClassifierSpec):
    name = "vit_b_16"
    builder_name = "vit_b_16"
    weights_enum = "ViT_B_16_Weights"
    crop_size = 224
