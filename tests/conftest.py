"""Test setup: 8 fake CPU devices for sharding tests, quiet TensorFlow that never takes an accelerator.

XLA's optimisation passes cost more than they save on the tiny models of the suite: turning most of
them off (as Flax's own example tests do) cuts the suite's CPU time by about 40%. A compilation cache
shared by the session and the processes it starts compiles each distinct program once: the tests that run
main.py again and again (resume, preemption, faults) would otherwise recompile the same train step.
Tests marked `slow` start processes (main.py, installs, scripts); `make test-fast` leaves them out.

Eight fake devices share two cores with the other pytest worker and the processes tests start: a device's
thread can reach a collective long after the others. XLA ends the whole process when that wait passes its
termination timeout (40 s by default), so the suite allows ten minutes.
"""

import os
import shutil
import tempfile

os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Made by the process that starts the session; xdist workers and subprocesses inherit the variable.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="esvit_jax_test_xla_cache_")


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
