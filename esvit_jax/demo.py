r"""`make demo`: pretrain a small network on the embedded demo dataset on this machine, say what it learned.

  python -m esvit_jax.demo --workdir demo_workdir [--config configs/demo.py] [--config.epochs=8]
  python -m esvit_jax.demo --workdir demo_workdir_mae --config configs/mae_demo.py    # MAE instead of EsViT

Runs a pretraining config file (default: the package's esvit_jax/configs/demo.py; loaded like main.py loads
one, `--config.NAME=VALUE` overrides included) through the same code as ImageNet runs: pretraining with
the k-NN monitor on, then the k-NN evaluation, a linear probe and a fine-tuning of the exported teacher (the
file's `task=knn`, `task=linear_probe` and `task=finetune` configs), each in its own sub-directory, and the
same fine-tuning of the network freshly initialised (`finetune_random`). It prints three k-NN top-1
figures computed by the same code on the same split with the same k: raw pixels, the network at
initialisation and the pretrained backbone (EsViT's teacher, MAE's encoder); for MAE it also draws the
reconstructions of a few test images. A second call resumes whatever did not finish.
"""

import os
import time
from typing import Any

from absl import app, flags
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_file  # main.py's --config loader.

from esvit_jax import cli, console, errors, mae_figure, sharding, tasks, writers  # console before TensorFlow.
from esvit_jax.data import multicrop, sources
from esvit_jax.evaluate import knn

RECONSTRUCTED_IMAGES = 8  # MAE: held-out images whose reconstructions the demo draws.
FINETUNINGS = {"pretrained": "finetune", "random": "finetune_random"}  # config.init -> sub-directory.

DEFAULT_CONFIG = epath.Path(__file__).parent / "configs" / "demo.py"  # Installed with the package.
_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "Where the runs write.")
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.fspath(DEFAULT_CONFIG),
  "The pretraining config file (it must also accept the arguments "
  "task=knn, task=linear_probe and task=finetune), e.g. configs/small.py:dataset=folder:/data/mine.",
  lock_config=True,
)


def compare_with_baselines(
  config: ml_collections.ConfigDict, workdir: epath.Path, config_file: str | None = None
) -> dict[str, Any]:
  """Pretrains config in workdir (or resumes it) and returns the three k-NN top-1 figures and the timing.

  Raw pixels (knn.evaluate_pixels), the network at initialisation (the k-NN monitor at step 0) and the
  pretrained teacher (the monitor at the last step) share the k-NN code, config.knn_k,
  config.knn_temperature, the splits and their sizes.

  Args:
    config: a pretraining config with the k-NN monitor on (config.eval_every_steps > 0).
    workdir: the pretraining workdir.
    config_file: the config file it came from, for the console's headline.

  Returns:
    {'pixels', 'initial', 'pretrained'} (top-1, %), 'steps' and 'pretrain_minutes'.
  """
  if not config.eval_every_steps:
    raise errors.UserError("The demo reads the k-NN monitor: set config.eval_every_steps > 0.")
  start = time.time()
  tasks.run(config, os.fspath(workdir), config_file)
  pretrain_minutes = (time.time() - start) / 60
  key = f"knn_top1_k{config.knn_k}"
  monitored = [r for r in writers.read_metrics(workdir) if key in r]
  if not monitored or monitored[0]["step"] != 0:
    raise errors.UserError(
      f"{workdir} holds no k-NN of the network at initialisation: it was started "
      "without the monitor. Use a new --workdir."
    )
  source = sources.get_source(
    config.dataset,
    data_dir=config.data_dir,
    manual_dir=config.manual_dir,
    splits=(config.train_split, config.eval_split),
    labels=True,
  )
  pixels = knn.evaluate_pixels(
    config,
    sharding.make_mesh(),
    source=source,
    ks=(config.knn_k,),
    temperature=config.knn_temperature,
    max_train=config.knn_train_examples,
    max_test=config.knn_eval_examples,
  )
  return {
    "pixels": pixels[key],
    "initial": monitored[0][key],
    "pretrained": monitored[-1][key],
    "steps": monitored[-1]["step"],
    "pretrain_minutes": pretrain_minutes,
  }


def _config_file_with(task: str) -> str:
  """The --config file and argument, with task=TASK added (the file's evaluation config)."""
  path, _, arg = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
  return f"{path}:{arg + ',' if arg else ''}task={task}"


def _shown(path: str) -> str:
  """A path as a person gave it: relative to the current directory when inside it."""
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def main(argv):
  """Pretrains (or resumes) in --workdir, evaluates the export by k-NN, linear probe and fine-tuning (beside
  a fine-tuning from initialisation), prints the summary.

  Args:
    argv: the arguments absl leaves after the flags (none are used).
  """
  del argv
  root = epath.Path(_WORKDIR.value)
  console.log_to_file(root)
  if not jax.config.jax_compilation_cache_dir:  # The second fine-tuning, and a rerun, compile nothing again.
    jax.config.update("jax_compilation_cache_dir", os.fspath(root / "xla_cache"))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  pretrain_dir = root / "pretrain"
  config = _CONFIG.value

  start = time.time()
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  figures = compare_with_baselines(config, pretrain_dir, _shown(config_path))
  results, eval_configs = {}, {}
  for task in ("knn", "linear_probe"):
    eval_configs[task] = config_file.ConfigFileFlagParser(task).parse(_config_file_with(task))
    eval_configs[task].pretrained = os.fspath(pretrain_dir / "export")
    results.update(tasks.run(eval_configs[task], os.fspath(root / task), _shown(_config_file_with(task))))
  finetuned = {}
  for init, name in FINETUNINGS.items():
    finetune_config = config_file.ConfigFileFlagParser("finetune").parse(_config_file_with("finetune"))
    finetune_config.update(pretrained=os.fspath(pretrain_dir / "export"), init=init)
    finetuned[init] = tasks.run(
      finetune_config, os.fspath(root / name), _shown(_config_file_with("finetune"))
    )
  is_mae = config.method == "mae"
  if is_mae:
    dataset, _ = multicrop.eval_dataset(
      config, config.eval_split, batch_size=RECONSTRUCTED_IMAGES, max_examples=RECONSTRUCTED_IMAGES
    )
    images = next(dataset.as_numpy_iterator())["image"]
    figure = mae_figure.save_reconstructions(pretrain_dir, images, root / "reconstruction.png", config.seed)
  minutes = (time.time() - start) / 60

  k = config.knn_k
  rows = {
    f"raw pixels (each image mean-centred, 2x2-averaged to {config.eval_crop_size} px)": "pixels",
    "the network at initialisation": "initial",
    f"the pretrained {'encoder' if is_mae else 'teacher'}": "pretrained",
  }
  model = config.model
  if is_mae:
    network = f"MAE demo: a ViT (embed {model.embed_dim}, depth {model.depth}, {model.num_heads} heads)"
  else:
    network = f"EsViT demo: a Swin (embed {model.embed_dim}, depths {tuple(model.depths)})"
  probe = eval_configs["linear_probe"]
  probe_input = f"the last {probe.n_last_blocks} blocks"
  if is_mae:  # A ViT: CLS tokens and, as configured, the mean patch token.
    blocks = "block" if probe.n_last_blocks == 1 else f"{probe.n_last_blocks} blocks"
    parts = [f"the CLS token of the last {blocks}"] if probe.n_last_blocks else []
    probe_input = " and ".join(parts + (["the mean patch token"] if probe.avgpool_patchtokens else []))
  knn_export = ", ".join(
    f"k={k}: {results[f'knn_top1_k{k}']:.1f}%" for k in (10, 20, 100, 200) if f"knn_top1_k{k}" in results
  )
  console.summary(
    f"{network} pretrained on {config.dataset!r}, {config.batch_size} images per step.",
    [
      f"Pretraining: {figures['steps']} steps; this call: {figures['pretrain_minutes']:.1f} min of "
      f"pretraining (less if it resumed a run), {minutes:.1f} min in all.",
      f"k-NN top-1 (k={k}, T={config.knn_temperature}, {config.eval_split} split, the same code for all "
      "three):",
      *(f"  {label + ':':<68}{figures[name]:5.1f}%" for label, name in rows.items()),
      f"  pretrained - raw pixels: {figures['pretrained'] - figures['pixels']:+.1f} points",
      f"k-NN evaluation of the export: {knn_export}",
      f"Linear probe on {probe_input}: best {results['linear_top1_best']:.1f}%, last "
      f"{results['linear_top1_last']:.1f}% top-1.",
      f"Fine-tuning every weight ({finetune_config.epochs} epochs), best top-1: from the pretrained "
      f"{'encoder' if is_mae else 'teacher'} {finetuned['pretrained']['top1_best']:.1f}%, from "
      f"initialisation {finetuned['random']['top1_best']:.1f}%.",
      f"Learning curves: {pretrain_dir / 'curves.png'}",
      *(
        [f"Reconstructions of {RECONSTRUCTED_IMAGES} {config.eval_split} images: {figure}"] if is_mae else []
      ),
      f"Outputs and log.txt under {root}/; TensorBoard: tensorboard --logdir {root}",
    ],
  )


if __name__ == "__main__":
  app.run(cli.exit_on_user_error(main), flags_parser=cli.parse_flags)
