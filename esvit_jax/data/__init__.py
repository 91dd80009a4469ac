"""Input pipelines: tf.data sources, DINO multi-crop augmentation, and the embedded demo dataset.

Import the submodules directly; this package imports nothing, so constants.py stays TensorFlow-free.
"""
