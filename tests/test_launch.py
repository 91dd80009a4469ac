"""The launch scripts end to end against stub `gcloud`, `sbatch` and `srun` that record their calls and run
the remote commands locally: each script installs the lock into a fresh Python 3.11 venv and starts main.py,
which trains two steps of tests/configs/tiny.py.

The installs are offline and take seconds: launch/install.sh passes uv's own settings through, so the test
sets UV_OFFLINE=1 (uv's cache, filled by `make install`, holds every pin) and JAX_EXTRA=cpu (the lock's jax
build; the accelerator builds are not in the cache).
"""

import json
import os
import random
import shlex
import socket
import subprocess
import sys
import textwrap

import pytest

from esvit_jax import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# `gcloud compute tpus tpu-vm VERB NAME ... --zone Z`: a slice is a folder of worker folders; `ssh` runs the
# command in every worker folder at once, as gcloud's --worker=all does on every worker's home.
GCLOUD = """
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
  log.write(json.dumps({"argv": ["gcloud", *args]}) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"] and "--zone" in args, args
verb = args[3]
name = args[5].split(":")[0] if verb == "scp" else args[4]  # scp SOURCE NAME:DESTINATION
slice_dir = os.path.join(os.environ["STUB_ROOT"], "tpu-" + name)
workers = [os.path.join(slice_dir, f"worker-{i}") for i in range(int(os.environ.get("STUB_WORKERS", "1")))]
if verb == "describe":
  sys.exit(0 if os.path.isdir(slice_dir) else 1)
if verb == "create":
  for worker in workers:
    os.makedirs(worker)
elif verb == "scp":
  assert "--worker=all" in args, args
  for worker in workers:
    shutil.copy(args[4], os.path.join(worker, args[5].split(":", 1)[1]))
elif verb == "ssh":
  assert "--worker=all" in args, args
  command = args[args.index("--command") + 1]
  procs = [subprocess.Popen(["bash", "-c", command], cwd=worker) for worker in workers]
  sys.exit(max(p.wait() for p in procs))
else:
  sys.exit(f"stub gcloud: unexpected {args}")
"""

# `sbatch [--opt ...] SCRIPT ARGS`: runs the batch script here, in the foreground, as SLURM's first node.
SBATCH = """
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
  log.write(json.dumps({"argv": ["sbatch", *args]}) + "\\n")
first = next(i for i, a in enumerate(args) if not a.startswith("--"))
nodes = next((int(o.split("=")[1]) for o in args[:first] if o.startswith("--nodes=")), 1)
env = {**os.environ, "SLURM_SUBMIT_DIR": os.getcwd(), "SLURM_JOB_ID": os.environ["STUB_JOB_ID"],
       "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "localhost"}
sys.exit(subprocess.call(["bash", *args[first:]], env=env))
"""

# `srun [--opt ...] COMMAND`: one task per node, all here, with the variables JAX reads to join them.
SRUN = """
import json, os, subprocess, sys
args = sys.argv[1:]
first = next(i for i, a in enumerate(args) if not a.startswith("--"))
with open(os.environ["STUB_LOG"], "a") as log:
  log.write(json.dumps({"argv": ["srun", *args],
                        "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS")}) + "\\n")
tasks = int(os.environ["SLURM_NNODES"])
procs = [subprocess.Popen(args[first:], env={**os.environ, "SLURM_STEP_NODELIST": "localhost",
                                             "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(rank),
                                             "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": str(tasks)})
         for rank in range(tasks)]
sys.exit(max(p.wait() for p in procs))
"""


def free_port(low: int = 1024, high: int = 65535) -> int:
  while True:
    port = random.randint(low, high)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
        return port
      except OSError:
        continue


@pytest.fixture
def stubs(tmp_path):
  """PATH with the stubs first (and this venv's uv); the environment the scripts and their commands see."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, source in (("gcloud", GCLOUD), ("sbatch", SBATCH), ("srun", SRUN)):
    (bin_dir / name).write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
    (bin_dir / name).chmod(0o755)
  (bin_dir / "uv").symlink_to(os.path.join(os.path.dirname(sys.executable), "uv"))
  cache = subprocess.run([str(bin_dir / "uv"), "cache", "dir"], capture_output=True, text=True, check=True)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    STUB_ROOT=str(tmp_path),
    STUB_LOG=str(tmp_path / "calls"),
    UV_OFFLINE="1",
    UV_PYTHON_DOWNLOADS="never",
    UV_CACHE_DIR=cache.stdout.strip(),
    JAX_EXTRA="cpu",
  )
  return env


def calls(env) -> list[dict]:
  with open(env["STUB_LOG"]) as f:
    return [json.loads(line) for line in f]


def checkout_copy(destination) -> str:
  """The repository as a user's checkout on a shared filesystem: git's files, not .venv or workdirs."""
  files = (
    subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      check=True,
    )
    .stdout.decode()
    .split("\0")
  )
  for name in filter(None, files):
    source, target = os.path.join(ROOT, name), os.path.join(destination, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(source):  # configs/ links to esvit_jax/configs/, as in a clone.
      os.symlink(os.readlink(source), target)
    elif os.path.exists(source):
      with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
  return str(destination)


def main_args(workdir) -> list[str]:
  return ["--config", "tests/configs/tiny.py", f"--workdir={workdir}", "--config.total_steps=2"]


def assert_trained_two_steps(workdir, venv_python):
  assert {r["step"] for r in writers.read_metrics(workdir) if "loss" in r} == {1, 2}
  version = subprocess.run(
    [venv_python, "-c", "import sys, jax; print(sys.version_info[:2], jax.__version__)"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert version.startswith("(3, 11)"), version


def test_tpu_pod_creates_the_slice_installs_on_every_worker_and_starts_main(stubs, tmp_path):
  port = free_port()
  env = {**stubs, "TPU_NAME": "esvit", "ZONE": "us-central2-b", "ACCELERATOR": "v4-8"}
  workdir = tmp_path / "workdir"
  extra = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=1", "--process_id=0"]
  done = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), *main_args(workdir), *extra],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
  verbs = [c["argv"][4] for c in calls(env)]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh"], verbs
  _, create, _, _, start = [c["argv"] for c in calls(env)]
  assert create[create.index("--version") + 1] == "tpu-ubuntu2204-base"
  command = start[start.index("--command") + 1]
  assert shlex.split(command)[3:] == [
    ".venv/bin/python",
    "main.py",
    "--distributed",
    *main_args(workdir),
    *extra,
  ]
  assert_trained_two_steps(
    workdir, str(tmp_path / "tpu-esvit" / "worker-0" / "esvit-jax" / ".venv" / "bin" / "python")
  )


def test_gpu_slurm_installs_on_the_shared_checkout_and_starts_main_on_every_node(stubs, tmp_path):
  port = free_port(61440, 65535)  # JAX derives the coordinator's port from SLURM_JOB_ID.
  env = {**stubs, "STUB_JOB_ID": str(port - 61440)}
  checkout = checkout_copy(tmp_path / "shared" / "esvit-jax")
  workdir = tmp_path / "workdir"
  done = subprocess.run(
    ["sbatch", "--nodes=1", "launch/gpu_slurm.sh", *main_args(workdir)],
    cwd=checkout,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
  sbatch, srun = calls(env)
  assert sbatch["argv"][:3] == ["sbatch", "--nodes=1", "launch/gpu_slurm.sh"]
  assert srun["argv"][1:] == [
    "--kill-on-bad-exit=1",
    ".venv/bin/python",
    "main.py",
    "--distributed",
    *main_args(workdir),
  ]
  assert srun["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"  # Every GPU of the node, not GPU SLURM_LOCALID.
  assert_trained_two_steps(workdir, os.path.join(checkout, ".venv", "bin", "python"))
