"""MAE's reconstruction figure from a pretraining workdir: per image, a row of the input, the masked input,
the reconstruction, and the reconstruction with the visible patches pasted back (MAE's own figure).

    python -m esvit_jax.visualize --pretrained MAE_WORKDIR --image IMG --out DIR

or, in a notebook:

    model, params, config = mae_figure.load_mae(workdir)
    panels = mae_figure.reconstruct(model, params, images, seed=0, norm_pix=config.norm_pix_loss)
    figure = mae_figure.reconstruction_figure(images, panels)

As MAE's visualisation: masked patches show the zero of the normalised input (the ImageNet mean colour, a
grey), and with norm_pix_loss, whose targets are per-patch normalised pixels, each predicted patch gets
the mean and standard deviation of the true patch back before the ImageNet normalisation is undone.
"""

import functools
import json
import math
import os
from typing import Any

import einops
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from esvit_jax import checkpointing, errors, losses, mae_step, visualize
from esvit_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD
from esvit_jax.data.normalize import normalize_images
from esvit_jax.models import mae

# What a masked patch shows: a normalised input of 0, i.e. the ImageNet mean pixel.
MASK_COLOUR = np.round(IMAGENET_MEAN * 255).astype(np.uint8)
NORM_PIX_EPS = 1e-6  # The variance offset of losses.normalized_pixels.


def is_mae_workdir(path: str | os.PathLike) -> bool:
  """Whether `path` is an MAE pretraining workdir: its config.json says "method": "mae".

  Args:
    path: any directory.

  Returns:
    True for an MAE workdir.
  """
  config_path = epath.Path(path) / "config.json"
  return config_path.exists() and json.loads(config_path.read_text()).get("method") == "mae"


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config of an MAE pretraining workdir, from its config.json.

  Args:
    workdir: an MAE pretraining workdir.

  Returns:
    The run's config; raises errors.NotFoundError without config.json, errors.UserError for another
    method's workdir.
  """
  config_path = epath.Path(workdir) / "config.json"
  if not config_path.exists():
    raise errors.NotFoundError(f"{workdir} is not a pretraining workdir: {config_path} is missing.")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  if config.get("method") != "mae":
    raise errors.UserError(f"{workdir} is a {config.get('method')!r} run; a reconstruction needs an MAE run.")
  return config


def load_mae(workdir: str | os.PathLike) -> tuple[mae.MaskedAutoencoder, Any, ml_collections.ConfigDict]:
  """The masked autoencoder of an MAE workdir's latest checkpoint, encoder and decoder.

  Only `params` is read from the checkpoint (an Orbax partial restore), onto the first device.

  Args:
    workdir: an MAE pretraining workdir (config.json and checkpoints/).

  Returns:
    (the MaskedAutoencoder of the run's config, its params, that config); raises errors.NotFoundError
    without config.json or a checkpoint, errors.UserError for another method's workdir.
  """
  workdir = epath.Path(workdir)
  config = load_config(workdir)
  steps = []
  if (workdir / "checkpoints").exists():  # Checked first: the Checkpointer would create the directory.
    checkpointer = checkpointing.Checkpointer(workdir)
    steps = checkpointer.all_steps()
    checkpointer.close()
  if not steps:
    raise errors.NotFoundError(f"{workdir} holds no checkpoint to reconstruct with.")
  model = mae_step.build_model(config)
  side = config.crop_size
  images = jnp.zeros((1, side, side, 3), model.dtype)
  ids = jnp.zeros((1, (side // model.encoder.patch_size) ** 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, ids)["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)}
  restored = ocp.PyTreeCheckpointer().restore(
    checkpointing.orbax_path(workdir) / "checkpoints" / str(steps[-1]) / "state",
    args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    ),
  )
  return model, restored["params"], config


@functools.partial(jax.jit, static_argnums=0)
def _predict(
  model: mae.MaskedAutoencoder, params: Any, images: jax.Array, ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(pred [B, N, p * p * 3], mask [B, N]) of the evaluation-mode autoencoder."""
  return model.apply({"params": params}, images, ids)


def _unpatchify(patches: np.ndarray, patch_size: int) -> np.ndarray:
  """[B, N, p * p * C] (losses.patchify's order) -> [B, H, W, C]."""
  grid = math.isqrt(patches.shape[1])
  return einops.rearrange(patches, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, p=patch_size, q=patch_size)


def _to_uint8(normalised: np.ndarray) -> np.ndarray:
  """ImageNet-normalised pixels -> uint8, rounded and clipped (normalize_images undone)."""
  pixels = (normalised * IMAGENET_STD + IMAGENET_MEAN) * 255
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _pixel_mask(mask: np.ndarray, patch_size: int) -> np.ndarray:
  """bool [B, N] per patch -> bool [B, H, W, 1] per pixel."""
  grid = math.isqrt(mask.shape[1])
  per_patch = mask.reshape(-1, grid, grid)
  return per_patch.repeat(patch_size, axis=1).repeat(patch_size, axis=2)[..., None]


def reconstruct(
  model: mae.MaskedAutoencoder, params: Any, images: np.ndarray, seed: int = 0, norm_pix: bool = True
) -> dict[str, np.ndarray]:
  """Masks each image at random, predicts its pixels, and draws the figure's panels.

  Args:
    model: the MaskedAutoencoder (load_mae).
    params: its params.
    images: uint8 [B, S, S, 3], S a multiple of the patch size.
    seed: the masks' seed; image i's mask is random_ids_shuffle's for (key(seed), position i).
    norm_pix: the model predicts per-patch normalised pixels (config.norm_pix_loss).

  Returns:
    {'masked', 'reconstruction', 'pasted': uint8 [B, S, S, 3]; 'mask': bool [B, N], True where a patch is
    masked, patches row-major}.
  """
  patch_size = model.encoder.patch_size
  x = normalize_images(images)
  num_patches = (images.shape[1] // patch_size) * (images.shape[2] // patch_size)
  ids = mae.random_ids_shuffle(jax.random.key(seed), jnp.arange(len(images)), num_patches)
  pred, mask = _predict(model, params, x.astype(model.dtype), ids)
  pred = np.asarray(pred, np.float64)
  if norm_pix:  # The true patch's statistics, as losses.normalized_pixels computes them.
    target = np.asarray(losses.patchify(x, patch_size), np.float64)
    mean = target.mean(axis=-1, keepdims=True)
    std = np.sqrt(target.var(axis=-1, ddof=1, keepdims=True) + NORM_PIX_EPS)
    pred = pred * std + mean
  mask = np.asarray(mask) > 0.5
  masked_pixels = _pixel_mask(mask, patch_size)
  reconstruction = _to_uint8(_unpatchify(pred, patch_size))
  return {
    "masked": np.where(masked_pixels, MASK_COLOUR, images),
    "reconstruction": reconstruction,
    "pasted": np.where(masked_pixels, reconstruction, images),
    "mask": mask,
  }


def reconstruction_figure(images: np.ndarray, panels: dict[str, np.ndarray], gap: int = 2) -> np.ndarray:
  """One row per image: input, masked input, reconstruction, reconstruction with the visible patches pasted.

  Args:
    images: uint8 [B, S, S, 3], the inputs of reconstruct.
    panels: reconstruct's output for them.
    gap: white pixels between panels.

  Returns:
    uint8 [B * (S + gap) - gap, 4 * (S + gap) - gap, 3].
  """
  row_panels = [
    panel
    for i, image in enumerate(images)
    for panel in (image, panels["masked"][i], panels["reconstruction"][i], panels["pasted"][i])
  ]
  return visualize.tile(row_panels, columns=4, gap=gap)


def save_reconstructions(
  workdir: str | os.PathLike, images: np.ndarray, out_path: str | os.PathLike, seed: int = 0
) -> epath.Path:
  """Writes the reconstruction figure of an MAE workdir's latest checkpoint for some images as a PNG.

  Args:
    workdir: an MAE pretraining workdir.
    images: uint8 [B, H, W, 3], any size: each is resized and centre-cropped to the run's crop size.
    out_path: the PNG to write (its directory is created if needed).
    seed: the masks' seed.

  Returns:
    The path written.
  """
  model, params, config = load_mae(workdir)
  fitted = np.stack([visualize.fit_image(Image.fromarray(image), config.crop_size) for image in images])
  panels = reconstruct(model, params, fitted, seed, norm_pix=config.norm_pix_loss)
  out_path = epath.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(reconstruction_figure(fitted, panels)).save(out_path)
  return out_path
