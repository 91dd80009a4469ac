r"""The small-data recipe on real images: scikit-learn's handwritten digits, k-NN against raw pixels.

  python benchmarks/digits.py --root /tmp/digits --workdir /tmp/digits_run --epochs 200

Writes the 1,797 8 x 8 digits (scikit-learn's copy of the UCI test set, shipped in its wheel) as an image
folder, ROOT/train/<digit>/*.png and ROOT/val/<digit>/*.png (a stratified 80/20 split, bicubic-upscaled
to 32 px RGB), then runs `python -m esvit_jax.demo` on `configs/small.py:dataset=folder:ROOT`: pretraining
with the k-NN monitor, and the k-NN top-1 of raw pixels, of the network at initialisation and of the
pretrained teacher, all on the val split by the same code. BENCHMARKS.md records the results: 1,437
images need a long schedule (30 epochs leave the network where it started; 200 beat the pixels).
"""

import argparse
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from sklearn import datasets, model_selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # configs/ and the package live here.


def write_image_folder(root: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
  """Writes the digits as root/{train,val}/<digit>/<index>.png.

  Args:
    root: the folder to create (existing files of the same names are overwritten).
    size: side of the written images, in px.
    val_fraction: the stratified share of the val split.
    seed: of the split.

  Returns:
    The number of images per split.
  """
  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # Values 0..16 -> 0..255.
  indices = {}
  indices["train"], indices["val"] = model_selection.train_test_split(
    np.arange(len(images)), test_size=val_fraction, stratify=digits.target, random_state=seed
  )
  for split, rows in indices.items():
    for i in rows:
      folder = os.path.join(root, split, str(digits.target[i]))
      os.makedirs(folder, exist_ok=True)
      image = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
      image.save(os.path.join(folder, f"{i:04d}.png"))
  return {split: len(rows) for split, rows in indices.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="Where the image folder is written.")
  parser.add_argument("--workdir", required=True, help="The demo's workdir (pretrain/, knn/, linear_probe/).")
  parser.add_argument("--epochs", type=int, default=200)
  parser.add_argument("--eval_every_steps", type=int, default=440)
  args = parser.parse_args()
  root = os.path.abspath(args.root)
  print(f"Wrote {write_image_folder(root)} images under {root}", flush=True)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "esvit_jax.demo",
      f"--workdir={os.path.abspath(args.workdir)}",
      f"--config=configs/small.py:dataset=folder:{root},epochs={args.epochs}",
      f"--config.eval_every_steps={args.eval_every_steps}",
    ],
    cwd=ROOT,
    check=True,
  )


if __name__ == "__main__":
  main()
