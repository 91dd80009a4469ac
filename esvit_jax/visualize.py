"""What a pretrained backbone learned, as PNGs: last-block attention per head, and region correspondences.

    python -m esvit_jax.visualize --pretrained EXPORT --image IMG --out DIR

(EXPORT may also be a pretraining workdir; an MAE workdir gives MAE's reconstruction figure instead, drawn
by esvit_jax/mae_figure.py) or, in a notebook:

    model, params = esvit_jax.export.load_backbone(path)
    image = visualize.load_image("cat.jpg", model.image_size)
    panels = visualize.attention_panels(model, params, image)           # one RGB array per head
    found = visualize.region_correspondences(model, params, image, visualize.augmented_view(image))

Both follow `analyze_models.py` of the official code: attention of the last block of the
last stage (for a Swin at 224 one 7x7 window: a 49x49 matrix per head; for a ViT the CLS token's row over
the patches, as DINO shows it) with DINO's mass thresholding, and cosine argmax matches between the
final-norm region tokens (Swin stage-4 or ViT patch tokens) of an image and of its flipped, colour-jittered,
grayscale copy.
Images are plain uint8 [S, S, 3] arrays; drawing uses Pillow only.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any

import einops
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, UnidentifiedImageError

from esvit_jax import cli, errors, export
from esvit_jax.data.constants import JITTER_STRENGTH
from esvit_jax.data.normalize import normalize_images
from esvit_jax.models.swin import SwinTransformer, block_windows
from esvit_jax.models.vit import VisionTransformer

# Anchors of a perceptually ordered dark-to-bright colour map (inferno-like), interpolated linearly.
HEAT_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
# A token index (row-major in the final grid), 'center', 'mean', 'cls' (ViT), or None: the model's default.
Query = int | str | None
LINE_COLOUR, OUTLINE_COLOUR, QUERY_COLOUR = (255, 230, 0), (0, 0, 0), (120, 200, 255)


def load_image(path: str | epath.PathLike, size: int) -> np.ndarray:
  """An RGB uint8 [size, size, 3]: shorter side resized to `size` (bicubic), then centre-cropped.

  Args:
    path: the image file (any format Pillow reads).
    size: the output side.

  Returns:
    uint8 [size, size, 3]; raises errors.NotFoundError if there is no such file, errors.UserError if
    Pillow cannot read it.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise errors.NotFoundError(f"{path}: no such image file.")
  with path.open("rb") as f:
    try:
      image = Image.open(f).convert("RGB")
    except UnidentifiedImageError as e:
      raise errors.UserError(f"{path} is not an image that Pillow reads.") from e
  return fit_image(image, size)


def fit_image(image: Image.Image, size: int) -> np.ndarray:
  """An RGB image as uint8 [size, size, 3]: shorter side resized to `size` (bicubic), then centre-cropped.

  Args:
    image: an RGB Pillow image.
    size: the output side.

  Returns:
    uint8 [size, size, 3].
  """
  scale = size / min(image.size)
  width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
  image = image.resize((width, height), Image.Resampling.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


Backbone = SwinTransformer | VisionTransformer


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: Backbone, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Final-norm region tokens [B, N, C] and the last block's attention: [B, num_windows, heads, n, n] for
  a Swin, [B, heads, 1 + N, 1 + N] (CLS first) for a ViT."""
  (_, regions), state = model.apply({"params": params}, images, mutable="intermediates")
  if isinstance(model, VisionTransformer):
    return regions, state["intermediates"][f"blocks_{model.depth - 1}"]["attn"]["attention"][0]
  last_stage = state["intermediates"][f"layers_{len(model.depths) - 1}"]
  return regions, last_stage[f"blocks_{model.depths[-1] - 1}"]["attn"]["attention"][0]


def default_query(model: Backbone) -> str:
  """The CLS token for a ViT (DINO's figures); the centre token for a Swin, which has no CLS token.

  Args:
    model: the backbone.

  Returns:
    'cls' or 'center'.
  """
  return "cls" if isinstance(model, VisionTransformer) else "center"


def window_token_positions(grid: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, window^2] flat position in the grid x grid token map of each window token, -1 for padding.

  Replays the block's own layout: zero-pad to a multiple of the window, roll by -shift, cut into windows.

  Args:
    grid: side of the block's token map.
    window: the block's window side.
    shift: the block's cyclic shift (0 for a regular block).

  Returns:
    int [num_windows, window^2].
  """
  padded = -(-grid // window) * window
  rows, cols = np.divmod(np.arange(padded * padded), padded)
  ids = np.where((rows < grid) & (cols < grid), rows * grid + cols, -1).reshape(padded, padded)
  ids = np.roll(ids, (-shift, -shift), axis=(0, 1))
  return einops.rearrange(ids, "(h wh) (w ww) -> (h w) (wh ww)", wh=window, ww=window)


def token_attention(attention: np.ndarray, grid: int, window: int, shift: int) -> np.ndarray:
  """One image's window attention [num_windows, heads, n, n] -> [heads, L, L] over the L = grid^2 tokens.

  Keys outside a query's window get 0; attention paid to padding tokens is dropped.

  Args:
    attention: float [num_windows, heads, n, n], n = window^2.
    grid: side of the block's token map.
    window: the block's window side.
    shift: the block's cyclic shift.

  Returns:
    float32 [heads, L, L], row = query token, column = key token.
  """
  positions = window_token_positions(grid, window, shift)
  full = np.zeros((attention.shape[1], grid * grid, grid * grid), np.float32)
  for w, ids in enumerate(positions):
    valid = ids >= 0
    full[:, ids[valid, None], ids[None, valid]] = attention[w][:, valid][:, :, valid]
  return full


def mass_mask(maps: np.ndarray, threshold: float = 0.6) -> np.ndarray:
  """DINO's thresholding: per map, the fewest tokens that together hold `threshold` of the attention mass.

  Args:
    maps: non-negative attention maps [m, ...], one map per leading index.
    threshold: the fraction of each map's mass to keep.

  Returns:
    bool of maps' shape, True on the kept tokens.
  """
  flat = maps.reshape(maps.shape[0], -1)
  order = np.argsort(-flat, axis=1)
  mass = np.take_along_axis(flat, order, axis=1)
  cumulative = np.cumsum(mass / mass.sum(axis=1, keepdims=True), axis=1)
  keep_sorted = np.concatenate(
    [np.ones_like(cumulative[:, :1], bool), cumulative[:, :-1] < threshold], axis=1
  )
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, axis=1)
  return keep.reshape(maps.shape)


def query_index(query: Query, grid: int) -> int | None:
  """The patch token whose attention is shown: 'center' -> the centre token, 'mean' or 'cls' -> None, or an
  index.

  Args:
    query: 'center', 'mean', 'cls' or a token index (row-major in the grid).
    grid: side of the final token grid.

  Returns:
    The token index, or None for 'mean' / 'cls'; raises errors.UserError for anything else.
  """
  if query in ("mean", "cls"):
    return None
  index = (grid // 2) * (grid + 1) if query == "center" else query
  if not isinstance(index, int) or not 0 <= index < grid * grid:
    raise errors.UserError(
      f"query must be 'center', 'mean', 'cls' (ViT) or a token index in [0, {grid * grid}), not {query!r}."
    )
  return index


def attention_maps(model: Backbone, params: Any, image: np.ndarray, query: Query = None) -> np.ndarray:
  """[heads, g, g] attention of the last block over the final g x g token grid of one uint8 image.

  For a ViT the default (query='cls') is the CLS token's attention over the patches, per head, as in
  DINO's figures. Swin has no CLS token, so, as analyze_models.py does, a map is the attention row of one
  query token (default: the centre token). query='mean' averages the rows of all patch tokens instead,
  showing where each head looks overall. Heads stay in model order (analyze_models.py sorts by entropy).

  Args:
    model: the backbone (an export's).
    params: its parameters.
    image: uint8 [S, S, 3] at the model's resolution.
    query: whose attention: 'cls', 'center', 'mean' or a token index; None for default_query(model).

  Returns:
    float32 [heads, g, g].
  """
  query = default_query(model) if query is None else query
  regions, attention = _forward(model, params, jnp.asarray(normalize_images(image[None])))
  grid = math.isqrt(regions.shape[1])
  if isinstance(model, VisionTransformer):
    full = np.asarray(attention[0])  # [heads, 1 + N, 1 + N], CLS first.
    rows = full[:, 0, 1:] if query == "cls" else None
    full = full[:, 1:, 1:]
  elif query == "cls":
    raise errors.UserError("query='cls' needs a ViT: a Swin has no CLS token.")
  else:
    window, shift = block_windows(model.image_size, model.patch_size, model.depths, model.window_size)[-1][-1]
    full, rows = token_attention(np.asarray(attention[0]), grid, window, shift), None
  if rows is None:
    index = query_index(query, grid)
    rows = full.mean(axis=1) if index is None else full[:, index]
  return rows.reshape(-1, grid, grid)


def heat_colours(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB on the HEAT_COLOURS scale.

  Args:
    values: float, any shape.

  Returns:
    uint8 [..., 3].
  """
  position = np.clip(values, 0, 1) * (len(HEAT_COLOURS) - 1)
  low = np.minimum(position.astype(int), len(HEAT_COLOURS) - 2)
  frac = (position - low)[..., None]
  return ((1 - frac) * HEAT_COLOURS[low] + frac * HEAT_COLOURS[low + 1]).round().astype(np.uint8)


def _upsample(grid_map: np.ndarray, size: int) -> np.ndarray:
  """A g x g map -> size x size, each token covering its patch of the image (nearest, as the official)."""
  resized = Image.fromarray(grid_map.astype(np.float32)).resize((size, size), Image.Resampling.NEAREST)
  return np.asarray(resized)


def _token_centre(index: int, grid: int, size: int) -> tuple[float, float]:
  row, col = divmod(index, grid)
  return (col + 0.5) * size / grid, (row + 0.5) * size / grid


def attention_panels(
  model: Backbone, params: Any, image: np.ndarray, query: Query = None, threshold: float = 0.6
) -> list[np.ndarray]:
  """One uint8 [S, S, 3] panel per head: the attention heat map over the image, the image dimmed outside
  the tokens that hold `threshold` of the mass, and the query token marked.

  Args:
    model: the backbone.
    params: its parameters.
    image: uint8 [S, S, 3].
    query: as attention_maps.
    threshold: the attention mass shown bright (mass_mask).

  Returns:
    heads panels, uint8 [S, S, 3] each.
  """
  query = default_query(model) if query is None else query
  maps = attention_maps(model, params, image, query)
  keep = mass_mask(maps, threshold)
  size, grid = image.shape[0], maps.shape[-1]
  panels = []
  for head_map, head_keep in zip(maps, keep, strict=False):
    heat = heat_colours(_upsample(head_map / max(float(head_map.max()), 1e-12), size)).astype(np.float32)
    inside = _upsample(head_keep.astype(np.float32), size)[..., None]
    panel = (0.45 * image + 0.55 * heat) * (0.35 + 0.65 * inside)
    panel = Image.fromarray(panel.round().astype(np.uint8))
    if (index := query_index(query, grid)) is not None:
      x, y = _token_centre(index, grid, size)
      radius = max(2.0, size / grid / 6)
      ImageDraw.Draw(panel).ellipse(
        (x - radius, y - radius, x + radius, y + radius), fill=QUERY_COLOUR, outline=OUTLINE_COLOUR
      )
    panels.append(np.asarray(panel))
  return panels


def tile(images: Sequence[np.ndarray], columns: int = 4, gap: int = 2) -> np.ndarray:
  """Equal-size images on a white grid, `columns` per row.

  Args:
    images: uint8 [h, w, 3] each, at least one.
    columns: images per row.
    gap: white pixels between images.

  Returns:
    uint8 [rows * (h + gap) - gap, columns * (w + gap) - gap, 3].
  """
  height, width, _ = images[0].shape
  rows = -(-len(images) // columns)
  columns = min(columns, len(images))
  canvas = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    canvas[
      r * (height + gap) : r * (height + gap) + height, c * (width + gap) : c * (width + gap) + width
    ] = image
  return canvas


def augmented_view(image: np.ndarray, seed: int = 0, grayscale: bool = True) -> np.ndarray:
  """The second view of analyze_models.py's correspondence measure: flipped, colour-jittered (fixed order,
  factors drawn from `seed`) and grayscale. No crop, so token (r, c) should match its mirror
  (r, g - 1 - c).

  Args:
    image: uint8 [S, S, 3].
    seed: seed of the jitter factors.
    grayscale: convert to grayscale last.

  Returns:
    uint8 [S, S, 3].
  """
  rng = np.random.default_rng(seed)
  view = Image.fromarray(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  for enhance, strength in (
    (ImageEnhance.Brightness, JITTER_STRENGTH["brightness"]),
    (ImageEnhance.Contrast, JITTER_STRENGTH["contrast"]),
    (ImageEnhance.Color, JITTER_STRENGTH["saturation"]),
  ):
    view = enhance(view).enhance(rng.uniform(1 - strength, 1 + strength))
  hue, saturation, value = view.convert("HSV").split()
  hue_shift = round(rng.uniform(-JITTER_STRENGTH["hue"], JITTER_STRENGTH["hue"]) * 255)  # As torchvision.
  hue = hue.point(lambda h: (h + hue_shift) % 256)
  view = Image.merge("HSV", (hue, saturation, value)).convert("RGB")
  return np.asarray(view.convert("L").convert("RGB") if grayscale else view)


@dataclasses.dataclass(frozen=True)
class Correspondences:
  """The top-k region matches from view 1 to view 2, most similar first."""

  pairs: np.ndarray  # [k, 2] token indices (view 1, view 2), row-major in the g x g grid.
  similarity: np.ndarray  # [k] cosine similarity of each pair.
  grid: int

  def mirrored_fraction(self) -> float:
    """Fraction of pairs landing on the mirror position (the right answer when view 2 is the flip).

    Returns:
      A float in [0, 1].
    """
    rows, cols = np.divmod(self.pairs[:, 0], self.grid)
    return float(np.mean(self.pairs[:, 1] == rows * self.grid + self.grid - 1 - cols))


def match_regions(
  features_1: np.ndarray, features_2: np.ndarray, top_k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """For every token of view 1 its cosine argmax in view 2; the top_k as (pairs [k, 2], similarity [k]).

  Args:
    features_1: view 1's tokens [N, C].
    features_2: view 2's tokens [M, C].
    top_k: how many matches to keep.

  Returns:
    pairs int [k, 2] (view 1 token, its match in view 2) and their cosine similarity [k], most similar
    first (k = min(top_k, N)).
  """

  def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  similarity = unit(features_1) @ unit(features_2).T
  best = similarity.argmax(axis=1)
  best_similarity = similarity[np.arange(len(best)), best]
  order = np.argsort(-best_similarity, kind="stable")[:top_k]
  return np.stack([order, best[order]], axis=1), best_similarity[order]


def region_correspondences(
  model: Backbone, params: Any, view_1: np.ndarray, view_2: np.ndarray, top_k: int = 10
) -> Correspondences:
  """Matches between the final-norm region tokens (the features of EsViT's region loss) of two views.

  Args:
    model: the backbone.
    params: its parameters.
    view_1: uint8 [S, S, 3].
    view_2: uint8 [S, S, 3], e.g. augmented_view(view_1).
    top_k: how many matches to keep.

  Returns:
    The top_k matches from view 1 to view 2.
  """
  regions, _ = _forward(model, params, jnp.asarray(normalize_images(np.stack([view_1, view_2]))))
  regions = np.asarray(regions, np.float64)
  pairs, similarity = match_regions(regions[0], regions[1], top_k)
  return Correspondences(pairs, similarity, math.isqrt(regions.shape[1]))


def draw_correspondences(
  view_1: np.ndarray, view_2: np.ndarray, found: Correspondences, margin: int = 5
) -> np.ndarray:
  """The two views side by side with a numbered line between the centres of each matched pair.

  Args:
    view_1: uint8 [S, S, 3].
    view_2: uint8 [S, S, 3].
    found: region_correspondences(view_1, view_2).
    margin: white pixels between the views.

  Returns:
    uint8 [S, 2S + margin, 3].
  """
  size = view_1.shape[0]
  canvas = np.full((size, 2 * size + margin, 3), 255, np.uint8)
  canvas[:, :size], canvas[:, size + margin :] = view_1, view_2
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  radius = max(2.0, size / found.grid / 8)
  for rank, (i, j) in enumerate(found.pairs):
    x1, y1 = _token_centre(int(i), found.grid, size)
    x2, y2 = _token_centre(int(j), found.grid, size)
    x2 += size + margin
    draw.line((x1, y1, x2, y2), fill=LINE_COLOUR, width=max(1, size // 150))
    for x, y in ((x1, y1), (x2, y2)):
      draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=LINE_COLOUR, outline=OUTLINE_COLOUR)
      draw.text((x + radius, y - 3 * radius), str(rank), fill=LINE_COLOUR)
  return np.asarray(image)


def visualize(
  model: Backbone,
  params: Any,
  image: np.ndarray,
  out_dir: str | epath.PathLike,
  *,
  query: Query = None,
  threshold: float = 0.6,
  top_k: int = 10,
  seed: int = 0,
) -> dict[str, Any]:
  """Writes image.png, attention_head{h}.png, attention_heads.png and correspondence.png into out_dir.

  Args:
    model: the backbone.
    params: its parameters.
    image: uint8 [S, S, 3] at the model's resolution.
    out_dir: where to write (created if needed).
    query: as attention_maps.
    threshold: the attention mass shown bright.
    top_k: how many region matches to draw.
    seed: seed of augmented_view's colour jitter.

  Returns:
    {'files': name -> path written, 'correspondences': the Correspondences drawn}.
  """
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = {"image": out / "image.png"}
  Image.fromarray(image).save(written["image"])
  panels = attention_panels(model, params, image, query, threshold)
  for head, panel in enumerate(panels):
    written[f"attention_head{head:02d}"] = out / f"attention_head{head:02d}.png"
    Image.fromarray(panel).save(written[f"attention_head{head:02d}"])
  written["attention_heads"] = out / "attention_heads.png"
  Image.fromarray(tile(panels)).save(written["attention_heads"])
  view_2 = augmented_view(image, seed)
  found = region_correspondences(model, params, image, view_2, top_k)
  written["correspondence"] = out / "correspondence.png"
  Image.fromarray(draw_correspondences(image, view_2, found)).save(written["correspondence"])
  return {"files": written, "correspondences": found}


def main(argv: Sequence[str] | None = None) -> None:
  """The command line of the module doc: writes the PNGs and prints how many matches are mirrored.

  Args:
    argv: the arguments after the program name (default: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(prog="python -m esvit_jax.visualize", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--pretrained",
    required=True,
    help="an export directory (model.json + params/) or a pretraining workdir; an MAE workdir gives "
    "MAE's reconstruction figure instead (esvit_jax/mae_figure.py)",
  )
  parser.add_argument("--image", required=True, help="the image to analyse (any format Pillow reads)")
  parser.add_argument("--out", required=True, help="directory for the PNGs")
  parser.add_argument(
    "--query",
    default=None,
    type=lambda q: q if q in ("center", "mean", "cls") else int(q),
    help="whose attention to show: 'cls' (a ViT's CLS token), 'center' (the centre "
    "token), 'mean' (all tokens), or a token index, row-major in the final grid (default: "
    "cls for a ViT, center for a Swin)",
  )
  parser.add_argument("--threshold", type=float, default=0.6, help="attention mass kept bright (default 0.6)")
  parser.add_argument("--top-k", type=int, default=10, help="matched region pairs to draw (default 10)")
  parser.add_argument("--size", type=int, help="input resolution (default: the model's, 224)")
  parser.add_argument(
    "--seed", type=int, default=0, help="seed of the second view's colour jitter (MAE: of the mask)"
  )
  args = parser.parse_args(argv)
  from esvit_jax import mae_figure  # pylint: disable=g-import-not-at-top  # It imports this module.

  if mae_figure.is_mae_workdir(args.pretrained):
    image = load_image(args.image, mae_figure.load_config(args.pretrained).crop_size)
    path = epath.Path(args.out) / "reconstruction.png"
    mae_figure.save_reconstructions(args.pretrained, image[None], path, seed=args.seed)
    print(f"Wrote {path}: the image, masked, reconstructed, and reconstructed with the visible patches.")
    return
  model, params = export.load_pretrained(args.pretrained)
  image = load_image(args.image, args.size or model.image_size)
  result = visualize(
    model,
    params,
    image,
    args.out,
    query=args.query,
    threshold=args.threshold,
    top_k=args.top_k,
    seed=args.seed,
  )
  found = result["correspondences"]
  print(
    f"Wrote {len(result['files'])} PNGs to {args.out}. Of the {len(found.pairs)} most similar region "
    f"pairs, {found.mirrored_fraction():.0%} land on the mirrored position (mean similarity "
    f"{found.similarity.mean():.3f})."
  )


if __name__ == "__main__":
  cli.run(main)
