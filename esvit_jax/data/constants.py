"""Input constants shared with the JAX side, which normalises uint8 crops on device (no TensorFlow here)."""

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # torchvision Normalize, RGB, on [0, 1].
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
JITTER_STRENGTH = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)  # DINO ColorJitter.
BLUR_SIGMA = (0.1, 2.0)  # DINO GaussianBlur radius range, in pixels of the crop.
# PIL's GaussianBlur at the largest sigma runs box passes of radius 1.375: per pass, 1 whole tap and one
# fractional tap each side, so 2 (device_augment and augment pad by this; a larger sigma needs more).
BLUR_BOX_EXTENT = 2
# DataAugmentationDINO's per-crop probabilities.
FLIP_PROB = 0.5
JITTER_PROB = 0.8
GRAY_PROB = 0.2
GLOBAL_BLUR_PROB = (1.0, 0.1)
GLOBAL_SOLARIZE_PROB = (0.0, 0.2)
LOCAL_BLUR_PROB = 0.5
