"""configs/small.py: loads by path like main.py, departs from the ImageNet recipe as documented, trains."""

import importlib.util
import math
import os

from ml_collections.config_flags import config_flags as config_file
import numpy as np
from PIL import Image
import pytest

from esvit_jax import errors, train, writers
from esvit_jax.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "small.py")


def load(arg: str):
  return config_file.ConfigFileFlagParser("small").parse(f"{SMALL}:{arg}")


def load_digits_benchmark():
  spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "benchmarks", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_small_recipe_values_and_arguments():
  config = load("dataset=demo")
  imagenet = common.pretrain_config("swin_tiny", drop_path_rate=0.2)
  departures = (
    "global_crop_size",
    "global_crop_scale",
    "num_local_crops",
    "color_jitter",
    "blur_sigma",
    "batch_size",
    "warmup_epochs",
    "lr",
    "momentum_teacher",
    "teacher_temp",
    "compute_dtype",
  )
  for name in departures:
    assert config[name] != imagenet[name], name
  assert config.teacher_temp == config.warmup_teacher_temp == 0.04
  assert (config.model.out_dim, config.model.norm_last_layer) == (1024, True)
  np.testing.assert_allclose(config.blur_sigma, (0.1 * 32 / 224, 2.0 * 32 / 224))
  big = load("dataset=folder:/x,crop=64,epochs=7")
  assert (big.model.image_size, big.global_crop_size, big.local_crop_size, big.eval_resize, big.epochs) == (
    64,
    64,
    32,
    72,
    7,
  )
  assert (load("dataset=demo,task=knn").task, load("dataset=demo,task=linear_probe").crop_size) == ("knn", 32)
  with pytest.raises(ValueError, match="multiple of 32"):
    load("dataset=demo,crop=48")
  assert issubclass(errors.UserError, ValueError)


def test_digits_benchmark_writes_a_stratified_image_folder(tmp_path):
  counts = load_digits_benchmark().write_image_folder(str(tmp_path), size=32)
  assert counts == {"train": 1437, "val": 360}
  for split, total in counts.items():
    per_class = [len(os.listdir(tmp_path / split / str(d))) for d in range(10)]
    assert sum(per_class) == total and max(per_class) - min(per_class) <= 2 * math.ceil(total / 100)
  with Image.open(next((tmp_path / "val" / "7").iterdir())) as image:
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))


@pytest.mark.slow
def test_small_recipe_trains_a_few_steps_on_an_image_folder(tmp_path):
  load_digits_benchmark().write_image_folder(str(tmp_path / "digits"), size=32)
  config = load(f"dataset=folder:{tmp_path / 'digits'}")
  # Tiny sizes for the test; every other field is the recipe's.
  config.model.update(
    dict(embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4), out_dim=64, hidden_dim=32, bottleneck_dim=16)
  )
  config.update(
    batch_size=16,
    total_steps=3,
    log_every_steps=1,
    eval_every_steps=3,
    knn_train_examples=64,
    knn_eval_examples=32,
    eval_batch_size=32,
  )
  train.train_and_evaluate(config, str(tmp_path / "run"))
  records = writers.read_metrics(tmp_path / "run")
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert [r["step"] for r in records if "knn_top1_k20" in r] == [0, 3]
  assert (tmp_path / "run" / "export").exists() and (tmp_path / "run" / "curves.png").exists()
