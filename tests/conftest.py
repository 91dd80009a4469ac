"""Test setup: 8 fake CPU devices for sharding tests, quiet TensorFlow that never takes an accelerator.

XLA's optimisation passes cost more than they save on the tiny models of the suite: turning most of
them off (as Flax's own example tests do) cuts the suite's CPU time by about 40%.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
