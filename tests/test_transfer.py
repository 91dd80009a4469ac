"""The transfer task (esvit_jax/evaluate/transfer.py, configs/transfer.py): the carved validation split, the
features in split order, the datasets opened before any work, and the task end to end on two image
folders of demo images: results, table, resume between datasets, the comparison of two backbones."""

import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from sklearn import linear_model
from sklearn import metrics as metrics_lib

from esvit_jax import errors, export, models, tasks
from esvit_jax.configs import transfer as transfer_config
from esvit_jax.data import multicrop, normalize, sources
from esvit_jax.evaluate import knn, transfer

TEST_SCORE_TOLERANCE = 1.0  # One of the 100 test images predicted otherwise than by scikit-learn at tol 1e-4.
TINY_SWIN = dict(
  embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2, image_size=16, drop_path_rate=0.0
)


def test_the_carved_validation_split_is_a_seeded_fifth_of_each_class():
  labels = np.repeat(np.arange(4), [10, 23, 1, 50])[np.random.default_rng(0).permutation(84)]
  train, val = transfer.carve(labels, 0.2, seed=3)
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(84))
  assert not set(train) & set(val)
  assert [int(np.sum(labels[val] == c)) for c in range(4)] == [2, 5, 1, 10]  # ceil(0.2 x 10, 23, 1, 50)
  again, other_seed = transfer.carve(labels, 0.2, seed=3)[1], transfer.carve(labels, 0.2, seed=4)[1]
  assert np.array_equal(val, again) and not np.array_equal(val, other_seed)


def test_the_search_subset_keeps_at_most_the_limit_of_each_class():
  labels = np.repeat(np.arange(3), [5, 30, 12])
  kept = transfer.per_class_subset(labels, 10, seed=0)
  assert [int(np.sum(labels[kept] == c)) for c in range(3)] == [5, 10, 10]
  assert len(set(kept)) == len(kept) and np.array_equal(kept, np.sort(kept))


def test_the_catalog_holds_the_protocols_splits_and_metrics():
  config = transfer_config.get_config()
  assert config.datasets.split(",") == list(transfer_config.DEFAULT_DATASETS)
  per_class = {n for n, e in config.catalog.items() if e.metric == "mean_per_class"}
  assert per_class == {"oxford_iiit_pet", "caltech101", "oxford_flowers102"}
  given_val = {n for n, e in config.catalog.items() if e.val is not None}
  assert given_val == {"dtd", "oxford_flowers102", "patch_camelyon", "sun397/tfds"}
  assert config.catalog.food101.test == "validation"
  assert config.catalog.patch_camelyon.search_per_class == 10_000
  assert (config.eval_resize, config.eval_crop_size, config.val_fraction) == (224, 224, 0.2)
  assert (config.max_iter, config.tol, config.matmul_precision) == (1000, 1e-4, "highest")
  assert "transfer" in tasks.EVALUATION_TASKS


def test_a_dataset_that_is_not_prepared_stops_the_run_before_any_extraction(tmp_path):
  config = transfer_config.get_config()
  config.update(pretrained="unused", datasets="demo,cifar10", data_dir=str(tmp_path / "tfds"))
  (tmp_path / "tfds").mkdir()
  with pytest.raises(errors.NotFoundError, match="tfds build cifar10"):
    transfer.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config.datasets = "demo,demo"
  with pytest.raises(errors.UserError, match="twice"):
    transfer.run(config, str(tmp_path / "run"))
  config.update(datasets="demo")
  config.catalog.demo.metric = "top5"
  with pytest.raises(errors.UserError, match="mean_per_class"):
    transfer.run(config, str(tmp_path / "run"))


def test_features_come_back_in_split_order_from_8_devices(monkeypatch, capsys):
  """An eval batch that does not divide the split leaves padding rows; they are dropped and the rest keeps
  the split's order. A long extraction shows how far it is."""
  config = transfer_config.get_config()
  config.update(eval_resize=64, eval_crop_size=64, eval_batch_size=48)
  dataset = transfer.Dataset("demo", sources.DemoSource(), "train", None, "test", "accuracy")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  monkeypatch.setattr(sources.DemoSource, "num_examples", lambda self, split: 100)
  forward = jax.jit(lambda images: images.astype(jnp.float32).mean(axis=(1, 2)))
  features, labels = transfer.extract_split(forward, config, dataset, "test", mesh)
  images, expected_labels = sources.DemoSource.arrays("test")
  np.testing.assert_array_equal(labels, expected_labels[:100])
  np.testing.assert_allclose(features, images[:100].astype(np.float64).mean(axis=(1, 2)), rtol=1e-5)
  assert "demo test: batch" not in capsys.readouterr().out
  monkeypatch.setattr(transfer, "PROGRESS_SECONDS", 0)
  transfer.extract_split(forward, config, dataset, "test", mesh)
  assert re.findall(r"demo test: batch (\d) of 3", capsys.readouterr().out) == ["1", "2", "3"]


# ---------------------------------------------------------------------------------------------------------
# End to end: a random tiny Swin on two image folders of demo images.


def swin_export(path, seed):
  backbone = models.build_backbone("swin_tiny", **TINY_SWIN)
  params = backbone.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))["params"]
  export.save_backbone(path, backbone, params, source="test")
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two image folders of demo images: 'carved' without a validation split (scored by top-1), 'given' with
  one (scored by mean per-class accuracy)."""
  root = tmp_path_factory.mktemp("transfer")
  images, labels = sources.DemoSource.arrays("train")
  layout = {"carved": {"train": range(0, 500), "test": range(500, 700)}}
  layout["given"] = {"train": range(700, 1000), "val": range(1000, 1100), "test": range(1100, 1200)}
  for name, splits in layout.items():
    for split, rows in splits.items():
      for i in rows:
        directory = root / name / split / f"class{labels[i]}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(directory / f"{i}.png")
  return {
    "carved": f"folder:{root / 'carved'}",
    "given": f"folder:{root / 'given'}",
    "a": swin_export(root / "a", 0),
    "b": swin_export(root / "b", 1),
  }


def tiny_config(setup, pretrained, **overrides):
  config = transfer_config.get_config()
  config.update(datasets=f"{setup['carved']},{setup['given']}", pretrained=setup[pretrained])
  config.update(eval_resize=16, eval_crop_size=16, eval_batch_size=200, **overrides)
  config.catalog[setup["given"]] = transfer_config.split_entry("train", "val", "test", "mean_per_class")
  return config


@pytest.fixture(scope="module")
def run_a(setup, tmp_path_factory):
  """The task on backbone a: its workdir, metrics and console output; the splits extracted; the rows of
  each fit."""
  workdir = tmp_path_factory.mktemp("a")
  with pytest.MonkeyPatch.context() as patch:
    spy = Spy(patch)
    with contextlib.redirect_stdout(io.StringIO()) as out:
      metrics = tasks.run(tiny_config(setup, "a"), str(workdir))
  return workdir, metrics, out.getvalue(), spy


class Spy:
  """Counts the splits extracted and the rows of each fit (on the host, before they go to the devices)."""

  def __init__(self, monkeypatch):
    self.extracted, self.fitted_rows = [], []
    extract, rows = transfer.extract_split, transfer.Regression.rows

    def extract_split(forward, config, dataset, split, mesh):
      self.extracted.append((dataset.name, split))
      return extract(forward, config, dataset, split, mesh)

    def recording_rows(regression, x, labels):
      self.fitted_rows.append(len(x))
      return rows(regression, x, labels)

    monkeypatch.setattr(transfer, "extract_split", extract_split)
    monkeypatch.setattr(transfer.Regression, "rows", recording_rows)


def features_of(workdir, name, split):
  (path,) = (workdir / "features").glob(f"*{name}/{split}.npz")
  saved = np.load(path)
  return saved["features"], saved["labels"]


@pytest.mark.slow
def test_the_task_writes_every_search_point_prints_the_table_and_resumes_between_datasets(
  setup, run_a, tmp_path, monkeypatch
):
  workdir, metrics, table, spy = run_a
  record = json.loads((workdir / "results.json").read_text())
  assert record["metrics"] == metrics and record["pretrained"] == setup["a"]
  carved, given = record["details"]
  assert set(metrics) == {f"{setup['carved']}_accuracy", f"{setup['given']}_mean_per_class", "mean"}
  assert metrics["mean"] == pytest.approx((carved["test"] + given["test"]) / 2)
  # 'carved' has its validation split carved from train (a fifth of each class); 'given' reads its val/.
  counts = np.bincount(sources.DemoSource.arrays("train")[1][:500])
  num_val = int(np.sum(np.ceil(0.2 * counts)))
  assert (carved["num_train"], carved["num_val"], carved["num_test"]) == (500 - num_val, num_val, 200)
  assert (given["num_train"], given["num_val"], given["num_test"]) == (300, 100, 100)
  assert "carved" in carved["validation_split"] and given["validation_split"] == "val"
  # Every point of the search is recorded and the chosen C is the best of them (ties: the smaller C).
  for d in (carved, given):
    curve = dict((c, s) for c, s in d["val_curve"])
    assert 7 < len(curve) <= 15 and d["val"] == max(curve.values()) == curve[d["c"]]
    assert d["c"] == min(c for c, s in curve.items() if s == d["val"])
  # The refit is on train + validation (the last rows put on the devices before the test's), and scores on
  # test what scikit-learn scores with the chosen C on the same features.
  assert spy.fitted_rows[-2:] == [400, 100] and 500 in spy.fitted_rows
  x = {split: features_of(workdir, "given", split) for split in ("train", "val", "test")}
  reference = linear_model.LogisticRegression(C=given["c"], max_iter=1000, tol=1e-4)
  reference.fit(np.concatenate([x["train"][0], x["val"][0]]), np.concatenate([x["train"][1], x["val"][1]]))
  expected = 100 * metrics_lib.balanced_accuracy_score(x["test"][1], reference.predict(x["test"][0]))
  assert given["test"] == pytest.approx(expected, abs=TEST_SCORE_TOLERANCE)
  assert sorted(spy.extracted) == sorted(
    [
      (setup["carved"], "train"),
      (setup["carved"], "test"),
      *((setup["given"], s) for s in ("train", "val", "test")),
    ]
  )
  for text in ("accuracy", "mean_per_class", f"{carved['test']:.2f}%", f"{given['c']:.3g}", "given"):
    assert text in table
  # The features kept are the backbone's pooled output of the evaluation transform's images, as they are.
  model, params = export.load_pretrained(setup["a"])
  config = tiny_config(setup, "a")
  images, _ = multicrop.eval_dataset(
    config, "test", batch_size=100, source=sources.get_source(setup["given"])
  )
  pooled = jax.jit(model.apply)(
    {"params": params}, normalize.normalize_images(next(images.as_numpy_iterator())["image"])
  )[0]
  np.testing.assert_allclose(x["test"][0], pooled, rtol=1e-5, atol=1e-5)

  # A run stopped by a failure on the second dataset keeps the first; the same command continues.
  spy = Spy(monkeypatch)
  calls = []
  evaluate = transfer.evaluate_dataset

  def fail_on_the_second(dataset, *args):
    calls.append(dataset.name)
    if len(calls) == 2:
      raise RuntimeError("preempted")
    return evaluate(dataset, *args)

  monkeypatch.setattr(transfer, "evaluate_dataset", fail_on_the_second)
  with pytest.raises(RuntimeError, match="preempted"):
    tasks.run(config, str(tmp_path))
  assert len(list((tmp_path / "datasets").glob("*carved.json"))) == 1
  assert not (tmp_path / "results.json").exists()
  monkeypatch.setattr(transfer, "evaluate_dataset", evaluate)
  spy.extracted.clear()
  assert tasks.run(config, str(tmp_path)) == metrics
  assert sorted(spy.extracted) == sorted((setup["given"], s) for s in ("train", "val", "test"))

  # Again: nothing is extracted; with another feature, the features are extracted again.
  spy.extracted.clear()
  assert tasks.run(config, str(tmp_path)) == metrics and spy.extracted == []
  config.update(features="mean_patch", datasets=setup["carved"])
  tasks.run(config, str(tmp_path))
  assert spy.extracted == [(setup["carved"], "train"), (setup["carved"], "test")]


@pytest.mark.slow
def test_two_backbones_compared_dataset_by_dataset_with_a_chart(setup, run_a, tmp_path, capsys):
  metrics = tasks.run(tiny_config(setup, "b", compare=str(run_a[0])), str(tmp_path))
  out = capsys.readouterr().out
  theirs = json.loads((run_a[0] / "results.json").read_text())["details"]
  record = json.loads((tmp_path / "results.json").read_text())
  comparison = record["comparison"]
  ours = [d["test"] for d in record["details"]]
  assert [r["ours"] for r in comparison["datasets"]] == ours
  assert [r["theirs"] for r in comparison["datasets"]] == [d["test"] for d in theirs]
  assert ours != [d["test"] for d in theirs]  # Two different random backbones.
  better = sum(o > t["test"] for o, t in zip(ours, theirs, strict=True))
  assert (comparison["better"], comparison["of"]) == (better, 2)
  assert f"better on {better} of 2 datasets" in out
  assert comparison["other_pretrained"] == setup["a"] and metrics["mean"] == pytest.approx(np.mean(ours))
  with Image.open(tmp_path / transfer.COMPARISON_CHART) as chart:
    assert chart.size[0] > 300
  with pytest.raises(errors.NotFoundError, match="not the results.json of a transfer run"):
    transfer.compare(record["details"], tmp_path / "datasets")


def test_the_features_are_the_pooled_backbone_features_not_normalised():
  backbone = models.build_backbone("swin_tiny", **TINY_SWIN)
  images = np.asarray(jax.random.randint(jax.random.key(0), (2, 16, 16, 3), 0, 256), np.uint8)
  params = backbone.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
  features = jax.jit(lambda x: knn.frozen_features(backbone, params, x, jnp.float32))(images)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  pooled, _ = jax.jit(backbone.apply)(
    {"params": params}, jnp.asarray((images / 255 - mean) / std, jnp.float32)
  )
  np.testing.assert_allclose(features, pooled, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.linalg.norm(features, axis=-1), 1.0, atol=0.1)
