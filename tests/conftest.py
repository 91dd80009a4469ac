"""Test setup: 8 fake CPU devices for sharding tests, quiet TensorFlow that never takes an accelerator.

XLA's optimisation passes cost more than they save on the tiny models of the suite: turning most of
them off (as Flax's own example tests do) cuts the suite's CPU time by about 40%. A compilation cache
shared by the session and the processes it starts compiles each distinct program once: the tests that run
main.py again and again (resume, preemption, faults) would otherwise recompile the same train step.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="esvit_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
