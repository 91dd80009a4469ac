"""Every command line the documentation gives works as written, from where the text says to run it.

Commands are read from the code blocks and the `python ...` code spans of README.md, BENCHMARKS.md,
launch/README.md and docs/, and from the usage lines of the module docstrings of main.py, the configs
(esvit_jax/configs/) and benchmarks/. HOW says how each one is checked:

- Shortened (a tiny config, fewer images or steps where the full command takes minutes): it runs
  in its own subprocess with the environment of a user's shell (no PYTHONPATH; `python` is this
  interpreter), from the checkout's root, or from an empty directory for a `python -m esvit_jax.*` command
  that names no file of the checkout (the package's tools work from anywhere). It must exit with 0.
- ParseOnly, where running it takes hours, an accelerator or data a test machine lacks: the program's own
  parser reads its arguments, in the same environment and directory. One process per program starts it as
  `python` would (the script's directory first on sys.path, or the directory for `-m`) and stops it where
  it reaches its parser; absl's flags are then parsed again for every command line of that program, and
  config_flags loads the --config file at every parse, so a config that does not import fails there, and so
  does a flag that the program does not define. An argparse tool's main() runs again up to its parse_args.
- NotRun, with the reason.

A documented command that HOW does not list fails the test, and so does an entry of HOW that no document
gives any more.
"""

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKDOWN = ("README.md", "BENCHMARKS.md", "launch/README.md", "docs/*.md")
DOCSTRINGS = ("main.py", "esvit_jax/configs/*.py", "benchmarks/*.py")
# The first word of a command line in a code block (after NAME=VALUE settings and `time`).
PROGRAM = re.compile(
  r"^(?:\w+=\S+\s+)*(?:time\s+)?(?:python|make|pip|sbatch|tfds|tensorboard|launch/\S+\.sh)"
)
CODE_SPAN = re.compile(r"`(python [^`*]+)`")  # Not `python -m esvit_jax.*`, a pattern.
CHECKOUT_PATH = re.compile(r"\b(?:configs|tests|benchmarks)/|\bmain\.py\b")


@dataclasses.dataclass(frozen=True)
class Shortened:
  """Run `command` instead ({tmp}: an empty directory); it must exit with 0."""

  command: str
  why: str


@dataclasses.dataclass(frozen=True)
class ParseOnly:
  """The program's parser reads the command's arguments (or those of `command`, which replaces a
  placeholder the parser would reject); the program does not run."""

  why: str
  command: str | None = None


@dataclasses.dataclass(frozen=True)
class NotRun:
  """Not run on a CPU machine, for the reason given."""

  why: str


TRAINING = "trains for hours on ImageNet with an accelerator"
STEP_RUN = "tests/test_flops.py runs the benchmark on tests/configs/tiny.py from the checkout's root"
DEMO_STEP = f"minutes on a CPU (BENCHMARKS.md); {STEP_RUN}"
MAE_STEP_RUN = "tests/test_flops.py runs the benchmark on tests/configs/mae_tiny.py from the checkout's root"
MAE_CHECK_RUN = "tests/test_accelerator_check.py runs the check on tests/configs/mae_tiny.py"
CHECKPOINT = "needs an official PyTorch checkpoint; tests/test_convert.py converts generated ones"

HOW = {
  # README.md: Install.
  "pip install .": NotRun("installs from the network; tests/test_packaging.py installs the wheel offline"),
  'pip install ".[cuda12]"': NotRun("an NVIDIA GPU"),
  'pip install ".[torch]"': NotRun("installs from the network (make test installs torch)"),
  'pip install ".[test]"': NotRun("installs from the network (make install installs the lock)"),
  "pip download --no-deps --only-binary=:all: -d .whl dm-pix==0.4.5 ml-collections==1.1.0": NotRun(
    "downloads from the network"
  ),
  "pip wheel --no-deps -w .whl .": NotRun(
    "writes .whl/ for an accelerator host; tests/test_packaging.py builds"
  ),
  "pip install --no-deps .whl/*.whl && python benchmarks/accelerator_check.py": NotRun(
    "an accelerator host; tests/test_accelerator_check.py runs the check with TensorFlow unimportable"
  ),
  "python -m esvit_jax.convert from-torch checkpoint.pth OUT": ParseOnly(CHECKPOINT),
  "python -m esvit_jax.visualize --pretrained OUT --image photo.jpg --out figures/": ParseOnly(
    "needs an export; tests/test_visualize.py draws the figures"
  ),
  "python -m esvit_jax.plot WORKDIR": ParseOnly(
    "needs a pretraining workdir; tests/test_plot.py runs it on one"
  ),
  # README.md: Two commands.
  "time make demo": NotRun("six minutes of training; tests/test_demo.py runs the demo on a tiny config"),
  "make demo": NotRun("six minutes of training; tests/test_demo.py runs the demo on a tiny config"),
  "make test": NotRun("the suite this test is part of"),
  "make install": NotRun("installs from the network; the suite runs inside what it installed"),
  "make test-fast": NotRun("the suite this test is part of"),
  "make lint": NotRun("CI runs it before the suite (.ci/run)"),
  "make mutants": NotRun("three hours; tests/test_mutants.py runs the mutants of the once unguarded rows"),
  "make clean": NotRun("deletes the environment the suite runs in"),
  "python -m esvit_jax.demo --workdir demo_workdir": ParseOnly(
    "six minutes of training; tests/test_demo.py runs the demo on a tiny config"
  ),
  # README.md and esvit_jax/configs/: MAE.
  "python main.py --config configs/mae_tiny.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/mae_small.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/mae_base.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/mae_tiny_distill.py --config.distill.teacher=TEACHER "
  "--workdir DIR": ParseOnly(
    f"{TRAINING} and an MAE ViT-B teacher; tests/test_mae_train.py distils from a generated one"
  ),
  "python -m esvit_jax.demo --config configs/mae_demo.py --workdir demo_workdir_mae": ParseOnly(
    "minutes of training; tests/test_demo.py runs the MAE demo on a tiny config"
  ),
  "python main.py --config configs/mae_demo.py --workdir demo_workdir_mae/pretrain": ParseOnly(
    "minutes of training; tests/test_mae_train.py runs MAE pretraining end to end"
  ),
  "python main.py --config configs/mae_demo.py:task=knn --config.pretrained=demo_workdir_mae/pretrain "
  "--workdir demo_workdir_mae/knn": ParseOnly(
    "needs the pretraining above; tests/test_demo.py runs the MAE demo"
  ),
  "python -m esvit_jax.convert from-torch mae_pretrain_vit_base.pth TEACHER "
  "--config configs/mae_base.py": ParseOnly(
    "needs an official MAE checkpoint; tests/test_convert_mae.py converts generated ones"
  ),
  "python -m esvit_jax.convert from-torch mae_tiny_400e.pth.tar exports/mae_tiny "
  "--config configs/mae_tiny.py": ParseOnly(
    "needs an official MAE-Lite checkpoint; tests/test_convert_mae.py converts generated ones"
  ),
  "python -m esvit_jax.convert from-torch mae_tiny_400e.pth.tar workdirs/mae_tiny --full "
  "--config configs/mae_tiny.py": ParseOnly(
    "needs an official MAE-Lite checkpoint; tests/test_convert_mae.py converts and continues a generated one"
  ),
  # README.md: Pretraining.
  "python main.py --config configs/swin_t.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/swin_b.py:window=14 --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_s16.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/swin_t.py --config.batch_size=1024 --config.epochs=100 "
  "--workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/small.py:dataset=folder:/data/mine --workdir DIR": ParseOnly(
    "needs the user's image folder /data/mine"
  ),
  "python -m esvit_jax.demo --config configs/small.py:dataset=folder:/data/mine --workdir DIR": ParseOnly(
    "needs the user's image folder /data/mine"
  ),
  "python -c \"import tensorflow_datasets as tfds; tfds.builder('imagenet2012', data_dir='DIR', "
  "file_format='array_record').download_and_prepare( download_config=tfds.download.DownloadConfig("
  "manual_dir='MANUAL'))\"": NotRun("needs ImageNet's tar files"),
  "TPU_NAME=esvit ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_pod.sh --config configs/swin_t.py "
  "--workdir gs://BUCKET/esvit/swin_t": NotRun("needs gcloud and a TPU pod; tests/test_launch.py stubs them"),
  "sbatch --nodes=4 launch/gpu_slurm.sh --config configs/swin_t.py --workdir /shared/esvit/swin_t": NotRun(
    "needs SLURM and GPUs; tests/test_launch.py stubs sbatch and srun"
  ),
  "python -m esvit_jax.export WORKDIR OUT [--step N]": ParseOnly(
    "needs a pretraining workdir; tests/test_export.py exports one",
    "python -m esvit_jax.export WORKDIR OUT --step 9",
  ),
  # README.md: Official PyTorch checkpoints.
  "python -m esvit_jax.convert from-torch checkpoint.pth exports/swin_t [--key teacher|student]": ParseOnly(
    CHECKPOINT, "python -m esvit_jax.convert from-torch checkpoint.pth exports/swin_t --key student"
  ),
  "python -m esvit_jax.convert from-torch dino_deitsmall16_pretrain_full_checkpoint.pth "
  "exports/vit_s16": ParseOnly(CHECKPOINT),
  "python -m esvit_jax.convert from-torch checkpoint.pth workdirs/swin_t --full "
  "--config configs/swin_t.py": ParseOnly(CHECKPOINT),
  "python -m esvit_jax.convert to-torch exports/swin_t swin_t_esvit.pth": ParseOnly(
    "needs an export; tests/test_convert.py converts generated ones"
  ),
  "python -m esvit_jax.visualize --pretrained PATH --image IMG --out DIR": ParseOnly(
    "needs an export; tests/test_visualize.py draws the figures"
  ),
  # README.md and BENCHMARKS.md: benchmarks.
  "python benchmarks/train_step.py --config configs/swin_t.py --per_device_batch 64": ParseOnly(
    f"Swin-T at batch 64 needs an accelerator; {STEP_RUN}"
  ),
  "python benchmarks/train_step.py --config configs/swin_b.py --per_device_batch 32": ParseOnly(
    f"Swin-B at batch 32 needs an accelerator; {STEP_RUN}"
  ),
  "python benchmarks/accelerator_check.py": ParseOnly(
    "Swin-T in bf16 needs an accelerator; tests/test_accelerator_check.py runs it on tests/configs/tiny.py"
  ),
  "python benchmarks/faults.py --kills 20": ParseOnly("16 minutes; tests/test_faults.py lands a few kills"),
  "python benchmarks/train_step.py --config configs/demo.py --config.num_local_crops=4 --per_device_batch 64 "
  "--steps 10 --warmup 2": ParseOnly(DEMO_STEP),
  "python benchmarks/input_pipeline.py --batches=16 --batch_size=32": ParseOnly(
    "a minute; the shortened plain line runs the same code"
  ),
  "python benchmarks/input_pipeline.py --stages=false --batches=8 --batch_size=32": ParseOnly(
    "a minute; the shortened lines run the same code"
  ),
  "python benchmarks/input_pipeline.py --stages=false --batches=4 --batch_size=32 --num_images=160 "
  "--image_size=1200,1600": ParseOnly("a minute; the shortened plain line runs the same code"),
  "python benchmarks/train_step.py --config configs/demo.py --per_device_batch 64 --steps 5 --warmup 1 "
  "--pipeline_batches 4 --inference_batch 64": ParseOnly(DEMO_STEP),
  "python benchmarks/train_step.py --config configs/demo.py --per_device_batch 64 --loop_steps 48": ParseOnly(
    DEMO_STEP
  ),
  "python benchmarks/train_step.py --config configs/demo.py --config.augment_on=host --per_device_batch 64 "
  "--loop_steps 48": ParseOnly(DEMO_STEP),
  "python benchmarks/data_sources.py --num_images=256 --epochs=4": Shortened(
    "python benchmarks/data_sources.py --num_images=32 --epochs=1 --shards=2", "a minute: 32 images, not 256"
  ),
  "python benchmarks/digits.py --root /tmp/digits --workdir /tmp/digits_run --epochs 200": ParseOnly(
    "18 minutes of pretraining on a CPU (BENCHMARKS.md)"
  ),
  # launch/README.md.
  "python main.py --config ... --workdir ... --coordinator_address=HOST0:1234 --num_processes=N "
  "--process_id=I": ParseOnly(
    "one host of many; tests/test_multihost.py runs two processes",
    "python main.py --config configs/demo.py --workdir {tmp} --coordinator_address=127.0.0.1:1234 "
    "--num_processes=2 --process_id=0",
  ),
  # main.py.
  "python main.py --config configs/swin_t.py:window=14 --config.batch_size=1024 --workdir DIR": ParseOnly(
    TRAINING
  ),
  "python main.py --config configs/knn.py --config.pretrained=PATH --workdir DIR": ParseOnly(
    "needs ImageNet and an export; tests/test_knn.py evaluates one"
  ),
  "python main.py --config configs/linear_probe.py --config.pretrained=PATH --workdir DIR": ParseOnly(
    "needs ImageNet and an export; tests/test_evaluate.py probes one"
  ),
  # esvit_jax/configs/.
  "python main.py --config configs/demo.py --workdir demo_workdir/pretrain": ParseOnly(
    "six minutes of training; tests/test_train.py runs main.py from the root in the same environment"
  ),
  "python main.py --config configs/demo.py:task=knn --config.pretrained=demo_workdir/pretrain "
  "--workdir demo_workdir/knn": ParseOnly("needs the pretraining above; tests/test_demo.py runs all three"),
  "python main.py --config configs/demo.py:task=linear_probe --config.pretrained=demo_workdir/pretrain "
  "--workdir demo_workdir/linear_probe": ParseOnly(
    "needs the pretraining above; tests/test_demo.py runs all three"
  ),
  "python main.py --config configs/knn.py --config.pretrained=PATH --config.dataset=imagenet2012 "
  "--workdir DIR": ParseOnly("needs ImageNet and an export; tests/test_knn.py evaluates one"),
  "python main.py --config configs/small.py:dataset=folder:/data/mine,crop=64,epochs=200 "
  "--workdir DIR": ParseOnly("needs the user's image folder /data/mine"),
  "python main.py --config configs/small.py:dataset=folder:/data/mine,task=knn "
  "--config.pretrained=DIR/export --workdir DIR/knn": ParseOnly("needs the user's image folder /data/mine"),
  "python main.py --config configs/small.py:dataset=folder:/data/mine,task=finetune "
  "--config.pretrained=DIR/export --workdir DIR/finetune": ParseOnly(
    "needs the user's image folder /data/mine"
  ),
  "python main.py --config configs/demo.py:task=finetune --config.pretrained=demo_workdir/pretrain "
  "--workdir demo_workdir/finetune": ParseOnly(
    "needs the pretraining above; tests/test_demo.py runs the demo"
  ),
  "python main.py --config configs/mae_demo.py:task=finetune --config.pretrained=demo_workdir_mae/pretrain "
  "--workdir demo_workdir_mae/finetune": ParseOnly(
    "needs the pretraining above; tests/test_demo.py runs the demo"
  ),
  "python main.py --config configs/transfer.py --config.pretrained=PATH --workdir DIR": ParseOnly(
    "needs ten TFDS datasets and an export; tests/test_transfer.py runs the task on two image folders"
  ),
  "python main.py --config configs/transfer.py --config.pretrained=PATH --config.datasets=cifar10,dtd "
  "--config.compare=OTHER_DIR --workdir DIR": ParseOnly(
    "needs CIFAR-10, DTD and an export; tests/test_transfer.py compares two backbones on image folders"
  ),
  "python main.py --config configs/finetune.py --config.pretrained=PATH --workdir DIR": ParseOnly(
    "needs ImageNet and an export; tests/test_finetune.py fine-tunes one on an image folder"
  ),
  "python main.py --config configs/finetune_mae_tiny.py --config.pretrained=PATH --workdir DIR": ParseOnly(
    "needs ImageNet and an export; tests/test_finetune.py fine-tunes one on an image folder"
  ),
  "python main.py --config configs/finetune_mae_base.py --config.pretrained=PATH --workdir DIR": ParseOnly(
    "needs ImageNet and an export; tests/test_finetune.py fine-tunes one on an image folder"
  ),
  "python main.py --config configs/swin_b.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/swin_s.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/swin_s.py:window=14 --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/swin_t.py:window=14 --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_base.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_base.py:patch=8 --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_base.py:dino=true --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_s16.py:patch=8 --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_s16.py:dino=true --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_tiny.py --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_tiny.py:patch=8 --workdir DIR": ParseOnly(TRAINING),
  "python main.py --config configs/vit_tiny.py:dino=true --workdir DIR": ParseOnly(TRAINING),
  # benchmarks/.
  "python benchmarks/accelerator_check.py --per_device_batches=64,128 --folder=/data/imagenet": NotRun(
    "needs an accelerator and ImageNet"
  ),
  "python benchmarks/accelerator_check.py --config=tests/configs/tiny.py --per_device_batches=1,2 --steps=2 "
  "--warmup=0 --num_images=16 --image_size=48,64 --logistic=512,16,4 --out_dir=/tmp/check": ParseOnly(
    "a minute; tests/test_accelerator_check.py runs this line (64 images) from the checkout's root"
  ),
  "python benchmarks/logistic.py": ParseOnly(
    "about an hour on a CPU (scikit-learn's search); the shortened line runs the same code"
  ),
  "python benchmarks/logistic.py --sklearn=fits --cs=0.01,1": ParseOnly(
    "ten minutes on a CPU (BENCHMARKS.md); the shortened line runs the same code"
  ),
  "python benchmarks/logistic.py --num_examples=2000 --dim=32 --classes=5 --sklearn=none": Shortened(
    "python benchmarks/logistic.py --num_examples=2000 --dim=32 --classes=5 --sklearn=none --out_dir={tmp}",
    "seconds; the results JSON goes to an empty directory",
  ),
  "python benchmarks/logistic.py --num_examples=10000 --dim=256 --classes=20": ParseOnly(
    "five minutes on a CPU (BENCHMARKS.md); the shortened line runs the same code"
  ),
  "python benchmarks/data_sources.py": ParseOnly("a minute; the shortened line runs the same code"),
  "python benchmarks/data_sources.py --num_images=1024 --epochs=2": ParseOnly(
    "minutes; the shortened line runs the same code"
  ),
  "python benchmarks/input_pipeline.py": Shortened(
    "python benchmarks/input_pipeline.py --num_images=16 --batches=1 --batch_size=4 --stages=false",
    "24 CPU ms per image in host mode: 16 images, not 256",
  ),
  "python benchmarks/input_pipeline.py --folder=/data/imagenet --batches=50": NotRun("needs ImageNet"),
  "python benchmarks/input_pipeline.py --image_size=1200,1600": ParseOnly(
    "a minute; the shortened plain line runs the same code"
  ),
  "python benchmarks/train_step.py --config configs/demo.py --per_device_batch 8 --loop_steps 60": ParseOnly(
    DEMO_STEP
  ),
  "python benchmarks/train_step.py --config tests/configs/tiny.py --per_device_batch 2 --steps 3": ParseOnly(
    f"a minute; {STEP_RUN}"
  ),
  # benchmarks/ and BENCHMARKS.md: MAE.
  "python benchmarks/train_step.py --config configs/mae_tiny.py --per_device_batch 256": ParseOnly(
    f"MAE-Tiny at batch 256 needs an accelerator; {MAE_STEP_RUN}"
  ),
  "python benchmarks/train_step.py --config configs/mae_base.py --per_device_batch 128": ParseOnly(
    f"MAE-Base at batch 128 needs an accelerator; {MAE_STEP_RUN}"
  ),
  "python benchmarks/accelerator_check.py --config=configs/mae_tiny.py "
  "--per_device_batches=256,512": ParseOnly(f"MAE-Tiny in bf16 needs an accelerator; {MAE_CHECK_RUN}"),
  "python benchmarks/train_step.py --config configs/mae_tiny.py --config.compute_dtype=float32 "
  "--per_device_batch 4 --steps 3 --warmup 1 --inference_batch 8 --pipeline_batches 0": ParseOnly(
    f"a minute and a half on a CPU (BENCHMARKS.md); {MAE_STEP_RUN}"
  ),
  "python benchmarks/accelerator_check.py --config=configs/mae_tiny.py --config.compute_dtype=float32 "
  "--per_device_batches=4 --steps=3 --warmup=1 --host_batches=8 --out_dir=/tmp/mae_check": ParseOnly(
    f"a minute and a half on a CPU (BENCHMARKS.md); {MAE_CHECK_RUN}"
  ),
  "python benchmarks/faults.py --kills 3 --steps 4": ParseOnly("a minute; tests/test_faults.py runs it"),
}


def _logical_lines(lines: list[str]) -> list[str]:
  """Joins lines continued with a backslash; drops `# comments` and repeated spaces."""
  joined, current = [], ""
  for line in lines:
    current += line.strip()
    if current.endswith("\\"):
      current = current[:-1] + " "
      continue
    joined.append(" ".join(current.split(" #")[0].split()))
    current = ""
  return joined


def _markdown_commands(text: str) -> set[str]:
  """Command lines of fenced and indented code blocks, and `python ...` code spans of the prose."""
  blocks, block, prose, fenced, previous_blank = [], [], [], False, True
  for line in text.splitlines():
    if line.startswith("```"):
      fenced = not fenced
      blocks, block = blocks + [block], []
    elif fenced or (line.startswith("    ") and (previous_blank or block)):
      block.append(line)
    else:
      blocks, block = blocks + [block], []
      prose.append(line)
    previous_blank = not line.strip()
  lines = [line for block in blocks + [block] for line in _logical_lines(block)]
  spans = [" ".join(span.split()) for span in CODE_SPAN.findall("\n".join(prose))]
  return {line for line in lines if PROGRAM.match(line)} | set(spans)


def _docstring_commands(path: pathlib.Path) -> set[str]:
  """The usage lines (`python ...`) of a module docstring."""
  docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
  lines = _logical_lines(docstring.splitlines())
  return {line for line in lines if line.startswith("python ")}


def documented_commands() -> dict[str, list[str]]:
  """Every command line of the documents -> the files that give it."""
  sources = {}
  for pattern in MARKDOWN:
    for path in sorted(ROOT.glob(pattern)):
      for command in _markdown_commands(path.read_text()):
        sources.setdefault(command, []).append(str(path.relative_to(ROOT)))
  for pattern in DOCSTRINGS:
    for path in sorted(ROOT.glob(pattern)):
      for command in _docstring_commands(path):
        sources.setdefault(command, []).append(str(path.relative_to(ROOT)))
  return sources


def test_every_documented_command_is_run_or_says_why_not():
  documented = documented_commands()
  unlisted = sorted(
    f"{command}  ({', '.join(files)})" for command, files in documented.items() if command not in HOW
  )
  assert not unlisted, "documented commands that HOW neither runs nor excuses:\n" + "\n".join(unlisted)
  stale = sorted(set(HOW) - set(documented))
  assert not stale, "HOW lists commands that no document gives:\n" + "\n".join(stale)


def _user_shell(argv: list[str], cwd: pathlib.Path, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs argv as a user's shell would, with `python` this interpreter; nothing added to the path."""
  argv = [sys.executable if word == "python" else word for word in argv]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _runs_anywhere(command: str) -> bool:
  """The package's tools run from an empty directory unless the command names a file of the checkout."""
  return command.startswith("python -m esvit_jax.") and not CHECKOUT_PATH.search(command)


def _directory(command: str, tmp_path: pathlib.Path) -> pathlib.Path:
  """Where a user runs the command: the checkout's root, or a new empty directory under tmp_path."""
  if not _runs_anywhere(command):
    return ROOT
  empty = tmp_path / "cwd"
  empty.mkdir(exist_ok=True)
  return empty


def _config_files(command: str) -> list[str]:
  """The config files a command names (`--config FILE[:arg]` or `--config=FILE[:arg]`)."""
  return [m.split(":")[0] for m in re.findall(r"--config[ =]([^\s]+)", command) if m != "..."]


def _missing_configs(command: str, cwd: pathlib.Path) -> list[str]:
  """The config files that command names and cwd lacks (main.py says so; other tools fail later)."""
  return [config for config in _config_files(command) if not (cwd / config).is_file()]


RUNS = sorted(command for command, how in HOW.items() if isinstance(how, Shortened))


@pytest.mark.slow
@pytest.mark.parametrize("documented", RUNS)
def test_documented_command_runs(documented, tmp_path):
  how = HOW[documented]
  workdir = tmp_path / "run"
  workdir.mkdir()
  command = how.command.format(tmp=workdir)
  cwd = _directory(documented, tmp_path)
  assert not _missing_configs(command, cwd), f"{documented}: no such config in {cwd}"
  done = _user_shell(shlex.split(command), cwd)
  output = f"{command}\n(in {cwd}, exit code {done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
  assert done.returncode == 0 and "Traceback" not in done.stderr, output


# Run with `python -c` in the user's directory, as JSON [module or None, [argv, ...], results file].
# It starts the program as `python SCRIPT` / `python -m MODULE` would (sys.path[0], sys.argv, __main__) and
# stops it where it reaches its parser: absl's app.run, or argparse's parse_args once it has parsed. Then
# absl's flags are parsed from scratch for each argv; an argparse tool is started again for each argv. It
# writes one entry per argv to the results file: null when it parsed, else the traceback and the output.
PARSE_DRIVER = r'''
import argparse
import contextlib
import io
import json
import os
import runpy
import sys
import traceback

module, argvs, results_file = json.loads(sys.argv[1])
sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(argvs[0][0]))

from absl import app, flags
from ml_collections.config_flags import config_flags


class Reached(Exception):
  """The program reached its command-line parser: absl's or argparse's."""


def stop_at_app_run(main, argv=None, flags_parser=None):
  raise Reached("absl")


parse_args = argparse.ArgumentParser.parse_args


def parse_args_then_stop(parser, args=None, namespace=None):
  parse_args(parser, args, namespace)
  raise Reached("argparse")


app.run = stop_at_app_run
argparse.ArgumentParser.parse_args = parse_args_then_stop


def start(argv):
  """Runs the program as `python` does until it reaches its parser; returns which parser."""
  sys.argv = list(argv)
  try:
    if module:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
      runpy.run_path(argv[0], run_name="__main__")
  except Reached as reached:
    return str(reached)
  raise AssertionError("the program ended without reaching app.run or ArgumentParser.parse_args")


def unparsed_config_defaults():
  """Config flag -> its default file; config_flags loads it at definition unless sys.argv names a file."""
  config_defaults = {}
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser):
      config_defaults[name] = getattr(flag, "default_unparsed", flag.default)
  return config_defaults


def parse_flags(argv, config_defaults):
  """Parses argv from scratch: the config files load again, as in a new process."""
  sys.argv = list(argv)  # config_flags reads whether --config is given, and its overrides, from there.
  flags.FLAGS.unparse_flags()
  for name, default in config_defaults.items():
    for override in [f for f in flags.FLAGS if f.startswith(name + ".")]:  # Defined by the last parse.
      delattr(flags.FLAGS, override)
    if default is not None:
      flags.FLAGS.set_default(name, default)
  flags.FLAGS(argv)
  for name in config_defaults:
    if flags.FLAGS[name].value is not None:
      flags.FLAGS[name].value.keys()  # A file that could not be read raises here, not at the parse.


results, parser, config_defaults = [], None, {}
for argv in argvs:
  output = io.StringIO()
  try:
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
      if parser != "absl":
        parser = start(argv)
        config_defaults = unparsed_config_defaults()
      if parser == "absl":
        parse_flags(argv, config_defaults)
    results.append(None)
  except BaseException:  # SystemExit too: argparse and absl's usage errors end the process.
    results.append(traceback.format_exc() + output.getvalue())
with open(results_file, "w") as f:
  json.dump(results, f)
'''


def _parse_groups() -> dict[str, list[str]]:
  """The ParseOnly commands by program and directory: one process parses each group's command lines."""
  groups = {}
  for documented, how in sorted(HOW.items()):
    if isinstance(how, ParseOnly):
      words = shlex.split(how.command or documented)
      assert words[0] == "python", f"{documented}: ParseOnly needs `python SCRIPT` or `python -m MODULE`"
      program = " ".join(words[1:3]) if words[1] == "-m" else words[1]
      where = "from an empty directory" if _runs_anywhere(documented) else "from the checkout"
      groups.setdefault(f"{program} {where}", []).append(documented)
  return groups


PARSE_GROUPS = _parse_groups()


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(PARSE_GROUPS))
def test_documented_command_lines_parse(group, tmp_path):
  documented = PARSE_GROUPS[group]
  cwd = _directory(documented[0], tmp_path)
  commands = [(HOW[line].command or line).format(tmp=tmp_path / "run") for line in documented]
  missing = {line: _missing_configs(command, cwd) for line, command in zip(documented, commands, strict=True)}
  assert not any(missing.values()), f"config files missing from {cwd}: {missing}"
  words = [shlex.split(command)[1:] for command in commands]
  module = words[0][1] if words[0][0] == "-m" else None
  argvs = [["-m", *w[2:]] if module else w for w in words]
  results_file = tmp_path / "results.json"
  done = _user_shell(["python", "-c", PARSE_DRIVER, json.dumps([module, argvs, str(results_file)])], cwd)
  assert done.returncode == 0, (
    f"{group}: exit code {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
  )
  failed = [
    f"{line}\n(parsed: {command})\n{error[-5000:]}"
    for line, command, error in zip(documented, commands, json.loads(results_file.read_text()), strict=True)
    if error is not None
  ]
  assert not failed, (
    f"{len(failed)} of the {len(documented)} lines of {group} do not parse:\n\n" + "\n\n".join(failed)
  )
