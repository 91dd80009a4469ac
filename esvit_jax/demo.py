r"""`make demo`: pretrain a small Swin on the embedded demo dataset on this machine, evaluate it, and say
what it learned.

  python -m esvit_jax.demo --workdir demo_workdir

Runs configs/demo.py three times through the same code as ImageNet runs: pretraining (with the k-NN
monitor before and after), the k-NN evaluation, and a linear probe of the exported teacher, each in its
own sub-directory. A second call resumes whatever did not finish.
"""
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from etils import epath

from configs import demo
from esvit_jax import tasks
from esvit_jax import writers

_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "Where the three runs write.")


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  root = epath.Path(_WORKDIR.value)
  pretrain_dir = root / "pretrain"

  start = time.time()
  config = demo.get_config()
  tasks.run(config, pretrain_dir)
  pretrain_minutes = (time.time() - start) / 60
  key = f"knn_top1_k{config.knn_k}"
  monitored = [r for r in writers.read_metrics(pretrain_dir) if key in r]

  results = {}
  for task in ("knn", "linear_probe"):
    eval_config = demo.get_config(f"task={task}")
    eval_config.pretrained = os.fspath(pretrain_dir / "export")
    results.update(tasks.run(eval_config, root / task))
  minutes = (time.time() - start) / 60

  print("\n" + "=" * 78)
  print(f"EsViT demo: {config.model.backbone}-shaped Swin (embed {config.model.embed_dim}, depths "
        f"{tuple(config.model.depths)}) on the demo dataset ({config.batch_size} images per step).")
  print(f"Pretraining: {monitored[-1]['step']} steps in {pretrain_minutes:.1f} min; whole demo {minutes:.1f} min.")
  print(f"Teacher k-NN top-1 (k={config.knn_k}, demo test split): {monitored[0][key]:.1f}% at initialisation "
        f"-> {monitored[-1][key]:.1f}% after pretraining (10 classes: chance is 10%).")
  print("k-NN evaluation: " + ", ".join(f"k={k}: {results[f'knn_top1_k{k}']:.1f}%"
                                         for k in (10, 20, 100, 200) if f"knn_top1_k{k}" in results))
  print(f"Linear probe on the last 4 blocks: best {results['linear_top1_best']:.1f}%, last "
        f"{results['linear_top1_last']:.1f}% top-1 on the demo test split.")
  print(f"Outputs under {root}/; TensorBoard: tensorboard --logdir {root}")
  print("=" * 78)


if __name__ == "__main__":
  app.run(main)
