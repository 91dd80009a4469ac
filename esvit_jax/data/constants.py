"""Input constants shared with the JAX side, which normalises uint8 crops on device (no TensorFlow here)."""
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # torchvision Normalize, RGB, on [0, 1].
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
JITTER_STRENGTH = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)  # DINO ColorJitter.
BLUR_SIGMA = (0.1, 2.0)  # DINO GaussianBlur radius range, in pixels of the crop.
