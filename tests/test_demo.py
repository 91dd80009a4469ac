"""The demo's three k-NN figures: raw pixels, initialisation and pretrained, by the same k-NN code."""

import ast
import os
import subprocess
import sys

from ml_collections.config_flags import config_flags as config_file
import numpy as np
from PIL import Image
import pytest

from esvit_jax import demo, errors, writers
from esvit_jax.data import multicrop, sources
from esvit_jax.evaluate import knn
from tests.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_pixel_features(images, size):
  """2 x 2 block average, per-image mean-centring, L2 normalisation, from the definition."""
  b, h, w, c = images.shape
  f = h // size
  x = images.astype(np.float64).reshape(b, size, f, size, f, c).mean(axis=(2, 4)).reshape(b, -1)
  x -= x.mean(axis=1, keepdims=True)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_knn_top1(train_f, train_l, test_f, test_l, k, temperature, num_classes):
  sims = test_f @ train_f.T
  hits = 0
  for row, y in zip(sims, test_l, strict=True):
    nearest = np.argsort(-row, kind="stable")[:k]
    scores = np.zeros(num_classes)
    np.add.at(scores, train_l[nearest], np.exp(row[nearest] / temperature))
    hits += np.argmax(scores) == y
  return 100.0 * hits / len(test_l)


def test_pixel_features_match_numpy():
  images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(
    np.asarray(knn.pixel_features(images, 4)), numpy_pixel_features(images, 4), rtol=1e-5, atol=1e-6
  )
  with pytest.raises(errors.UserError, match="block-averaged"):
    knn.pixel_features(images, 3)


@pytest.mark.slow
def test_three_figures_come_from_the_same_knn_code_split_and_k(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.update(total_steps=3, eval_every_steps=3, knn_train_examples=96, knn_eval_examples=40)
  calls = []
  real = knn.evaluate_split_pair

  def spy(forward, cfg, mesh, **kwargs):
    fields = ("train_split", "eval_split", "eval_crop_size", "eval_resize")
    calls.append(({k: cfg[k] for k in fields}, {**kwargs, "source": kwargs["source"].describe()}))
    return real(forward, cfg, mesh, **kwargs)

  monkeypatch.setattr(knn, "evaluate_split_pair", spy)

  figures = demo.compare_with_baselines(config, tmp_path)

  # Teacher at step 0, teacher at step 3, pixels: one k-NN function with the same k, T, splits and sizes.
  assert len(calls) == 3
  (teacher_split, teacher_args), _, (pixel_split, pixel_args) = calls
  assert calls[0] == calls[1] and pixel_args == teacher_args
  assert teacher_args["ks"] == (config.knn_k,) and teacher_args["max_train"] == 96
  assert {k: pixel_split[k] for k in ("train_split", "eval_split")} == {
    k: teacher_split[k] for k in ("train_split", "eval_split")
  }
  assert pixel_split["eval_crop_size"] == pixel_split["eval_resize"] == 2 * config.eval_crop_size

  monitored = [r for r in writers.read_metrics(tmp_path) if "knn_top1_k20" in r]
  assert [r["step"] for r in monitored] == [0, 3]
  assert (figures["initial"], figures["pretrained"], figures["steps"]) == (
    monitored[0]["knn_top1_k20"],
    monitored[1]["knn_top1_k20"],
    3,
  )
  assert (tmp_path / "curves.png").exists()

  # The pixel figure, recomputed from the definition on the same images (demo images are 64 px).
  pixel_config = config.copy_and_resolve_references()
  pixel_config.eval_resize = pixel_config.eval_crop_size = 64
  source = sources.get_source("demo")
  data = {}
  for split, limit in ((config.train_split, 96), (config.eval_split, 40)):
    ds, _ = multicrop.eval_dataset(
      pixel_config, split, batch_size=32, source=source, max_examples=limit, process_index=0, process_count=1
    )
    batches = list(ds.as_numpy_iterator())
    mask = np.concatenate([b["mask"] for b in batches])
    data[split] = (
      numpy_pixel_features(np.concatenate([b["image"] for b in batches])[mask], 32),
      np.concatenate([b["label"] for b in batches])[mask],
    )
  expected = numpy_knn_top1(
    *data[config.train_split],
    *data[config.eval_split],
    k=20,
    temperature=config.knn_temperature,
    num_classes=10,
  )
  assert figures["pixels"] == pytest.approx(expected, abs=1e-6)


def test_demo_without_monitor_is_a_user_error(tmp_path):
  config = tiny.get_config()
  with pytest.raises(errors.UserError, match="eval_every_steps"):
    demo.compare_with_baselines(config, tmp_path)


def test_demo_loads_its_config_by_path_and_never_imports_the_configs_package():
  tree = ast.parse(open(demo.__file__).read())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert not [m for m in imported if m == "configs" or m.startswith("configs.")]
  assert demo.DEFAULT_CONFIG == demo.epath.Path(ROOT) / "esvit_jax" / "configs" / "demo.py"
  for task in ("pretrain", "knn", "linear_probe", "finetune"):
    config = config_file.ConfigFileFlagParser("c").parse(f"{demo.DEFAULT_CONFIG}:task={task}")
    assert config.task == task and config.eval_split == "test"


@pytest.mark.slow
def test_mae_demo_prints_its_figures_and_draws_reconstructions(tmp_path):
  workdir = tmp_path / "demo"
  command = [sys.executable, "-m", "esvit_jax.demo", "--config", "tests/configs/mae_tiny.py"]
  command += ["--config.eval_every_steps=6", f"--workdir={workdir}"]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "MAE demo: a ViT (embed 32, depth 2, 4 heads)" in done.stdout
  assert "from the pretrained encoder" in done.stdout and "from initialisation" in done.stdout
  for line in ("the network at initialisation:", "the pretrained encoder:", "Linear probe on the CLS token"):
    assert line in done.stdout, line
  figure = workdir / "reconstruction.png"
  assert f"Reconstructions of 8 test images: {figure}" in done.stdout
  assert Image.open(figure).size == (4 * 32 + 3 * 2, 8 * 32 + 7 * 2)
