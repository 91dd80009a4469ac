r"""Transfer to downstream datasets: logistic regression on frozen features, its regularisation searched.

  python main.py --config configs/transfer.py --config.pretrained=PATH --workdir DIR
  python main.py --config configs/transfer.py --config.pretrained=PATH --config.datasets=cifar10,dtd \
      --config.compare=OTHER_DIR --workdir DIR

The linear-probe protocol of CLIP, with which the EsViT paper compares backbones on downstream datasets: the
frozen teacher backbone's pooled final-norm feature (not normalised) of every image, resized to 224 px
(bicubic, shorter side) and centre-cropped to 224; a multinomial logistic regression with scikit-learn's
objective (mean cross-entropy + ||W||^2 / (2 C n), bias not penalised) fitted by L-BFGS on the
accelerator; C chosen on a validation split among 97 values from 1e-6 to 1e6 (seven decades first, then
the interval around the best halved until 8 steps per decade; ties to the smaller C); then the regression
refitted on train + validation at that C and scored on test with the dataset's metric.

PATH is an export, a pretraining workdir or a converted official checkpoint. Every dataset in
config.datasets must be prepared (pods have no internet: the run names the `tfds build` command of each
that is not) or be an image folder `folder:/path` with train/, test/ and, optionally, val/ (a folder without
val/ has its validation split carved from train like the TFDS datasets below). Each dataset's features are
kept in DIR/features and its result in DIR/datasets: the same command again skips what is done. DIR gets
results.json (every search point of every dataset, the mean over datasets) and, with config.compare (another
transfer run's DIR), comparison.png and the count of datasets on which this backbone is better.

Datasets not in TFDS, and so not offered: FGVC-Aircraft, FER2013, GTSRB, Hateful Memes; UCF101 (video) and
VOC2007 (multi-label, scored by 11-point mAP) are not either.
"""

import ml_collections

# The default datasets, by TFDS name: those of the paper's 18 that TFDS prepares by itself.
DEFAULT_DATASETS = (
  "cifar10",
  "cifar100",
  "food101",
  "dtd",
  "oxford_iiit_pet",
  "caltech101",
  "oxford_flowers102",
  "mnist",
  "stl10",
  "patch_camelyon",
)


def split_entry(train: str, val: str | None, test: str, metric: str = "accuracy", search_per_class: int = 0):
  """One dataset's splits and metric.

  Args:
    train: the training split.
    val: the validation split the search scores on; None to carve a seeded, class-stratified
      config.val_fraction of train (every carved example leaves train).
    test: the split the refitted regression is scored on.
    metric: 'accuracy' (top-1) or 'mean_per_class' (the mean over classes of their recall).
    search_per_class: if > 0, the search fits on a seeded subset of at most this many training examples per
      class (the refit uses all of train + validation).

  Returns:
    The ConfigDict.
  """
  return ml_collections.ConfigDict(
    dict(
      train=train,
      val=ml_collections.FieldReference(val, field_type=str),
      test=test,
      metric=metric,
      search_per_class=search_per_class,
    )
  )


def get_config(arg: str | None = None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "transfer"
  config.pretrained = ml_collections.FieldReference(None, field_type=str)
  config.datasets = ",".join(DEFAULT_DATASETS)  # TFDS names or folder:/path, comma-separated.
  config.data_dir = ml_collections.FieldReference(None, field_type=str)  # Where TFDS prepared them.
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  # Splits and metric of each TFDS dataset; a name not listed uses train / validation (carved if absent) /
  # test and top-1. Mean per-class accuracy for Pets, Caltech-101 and Flowers, as the protocol scores them.
  config.catalog = ml_collections.ConfigDict(
    {
      "cifar10": split_entry("train", None, "test"),
      "cifar100": split_entry("train", None, "test"),
      "food101": split_entry("train", None, "validation"),  # Food-101's only held-out split.
      "dtd": split_entry("train", "validation", "test"),
      "oxford_iiit_pet": split_entry("train", None, "test", "mean_per_class"),
      "caltech101": split_entry("train", None, "test", "mean_per_class"),
      "oxford_flowers102": split_entry("train", "validation", "test", "mean_per_class"),
      "mnist": split_entry("train", None, "test"),
      "stl10": split_entry("train", None, "test"),
      # 262,144 training images: the search fits on 10,000 per class, as Microsoft's benchmark does.
      "patch_camelyon": split_entry("train", "validation", "test", search_per_class=10_000),
      "sun397/tfds": split_entry("train", "validation", "test"),  # On request: 108,754 images.
      "cars196": split_entry("train", None, "test"),  # On request: TFDS needs its files downloaded by hand.
      "demo": split_entry("train", None, "test"),  # The embedded demo dataset, to try the task.
    }
  )
  config.val_fraction = 0.2  # Of each class of train, where a dataset has no validation split.
  config.seed = 0  # Of the carved validation splits and the search subsets.
  config.eval_resize = 224  # Shorter side, bicubic; then the centre crop. The protocol's 224 / 224.
  config.eval_crop_size = 224
  config.eval_batch_size = 256
  config.features = "pooled"  # Or 'mean_patch': the mean of the final-norm patch tokens (MAE's global pool).
  config.compute_dtype = "float32"
  config.matmul_precision = "highest"  # Features and regression in full float32 on every accelerator.
  config.max_iter = 1000  # L-BFGS iterations per fit, and the stopping tolerance on max |gradient|.
  config.tol = 1e-4
  config.compare = ml_collections.FieldReference(None, field_type=str)  # Another transfer run's workdir.
  return config
