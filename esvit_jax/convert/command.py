"""The command line of esvit_jax.convert (usage in the package's doc): which converter a file needs.

A file whose network is its 'model' entry, or has an MAE decoder, is an MAE or MAE-Lite checkpoint (its
encoder's heads from --config or the file's model name); any other is EsViT's or DINO's. With --full, the
config's method says which workdir is written: an MAE config's (config.method 'mae') or EsViT's.
"""

import argparse
from collections.abc import Sequence

from esvit_jax.convert import esvit, mae
from esvit_jax.convert.files import empty_dir, load_config, load_torch_file, select_network
from esvit_jax.convert.layout import WRAPPER_PREFIXES, ConversionError, strip_wrappers

DESCRIPTION = "Official EsViT, DINO, MAE and MAE-Lite PyTorch checkpoints <-> esvit-jax exports and workdirs."


def from_torch(
  checkpoint_path: str,
  out_dir: str,
  *,
  key: str = "teacher",
  image_size: int = 224,
  config_spec: str | None = None,
  trust_pickle: bool = False,
) -> str:
  """Writes the backbone (an MAE's encoder) of a .pth file as an export directory; returns a summary.

  Args:
    checkpoint_path: an official EsViT, DINO, MAE or MAE-Lite checkpoint, or a bare state dict.
    out_dir: the export directory to write (new or empty).
    key: which network of an EsViT or DINO checkpoint ('teacher' or 'student').
    image_size: the construction resolution of a Swin.
    config_spec: the config the weights were trained with, 'path/to/config.py[:arg]': it gives a ViT's
      heads (needed for an MAE checkpoint that does not name its model).
    trust_pickle: allow arbitrary pickled objects.

  Returns:
    The converter's summary and the directory written.
  """
  out = empty_dir(out_dir)
  raw = load_torch_file(checkpoint_path, trust_pickle=trust_pickle)
  checkpoint = select_network(raw, key)
  source = f"{checkpoint_path}:{checkpoint.key}" if checkpoint.key else str(checkpoint_path)
  config = None
  if config_spec is not None:
    config = (config_spec, *mae.config_heads(load_config(config_spec)))
  if mae.is_mae(checkpoint):
    width = mae.encoder_width(checkpoint.state_dict)
    heads, heads_from = mae.resolve_num_heads(width, config=config, name=mae.named_model(raw))
    return mae.export_encoder(checkpoint, out, source, num_heads=heads, heads_from=heads_from)
  heads = None
  if config is not None:
    if "cls_token" not in strip_wrappers(checkpoint.state_dict):
      raise ConversionError(
        ["--config gives a ViT's heads; a Swin's are read from its relative position tables."]
      )
    width = mae.encoder_width(checkpoint.state_dict, WRAPPER_PREFIXES)
    heads, _ = mae.resolve_num_heads(width, config=config)
  return esvit.export_network(checkpoint, out, source, image_size=image_size, num_heads=heads)


def main(argv: Sequence[str] | None = None) -> None:
  """The command line of the package doc: converts, then prints the summary.

  Args:
    argv: the arguments after the program name (default: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(prog="python -m esvit_jax.convert", description=DESCRIPTION)
  commands = parser.add_subparsers(dest="command", required=True)
  read = commands.add_parser("from-torch", help="official .pth checkpoint -> export directory")
  read.add_argument(
    "checkpoint",
    help="an official EsViT, DINO, MAE or MAE-Lite checkpoint (.pth), or a bare Swin or ViT state dict",
  )
  read.add_argument("out", help="the export directory to write (new or empty)")
  read.add_argument(
    "--key",
    default="teacher",
    choices=("teacher", "student"),
    help="which network of a full checkpoint (default: teacher, as for evaluation)",
  )
  read.add_argument(
    "--image-size",
    type=int,
    default=224,
    help="construction resolution of a Swin (224 for every official config); a ViT's is read "
    "from its position embeddings",
  )
  read.add_argument(
    "--trust-pickle",
    action="store_true",
    help="allow arbitrary pickled objects (torch.load weights_only=False): trusted files only",
  )
  read.add_argument(
    "--full",
    action="store_true",
    help="write a pretraining workdir that main.py continues, instead of an export of one backbone: "
    "student, teacher, both heads, centres and epoch of EsViT or DINO; encoder, decoder, mask token and "
    "epoch of an MAE (with an MAE --config)",
  )
  read.add_argument(
    "--config",
    default=None,
    help="the config of the checkpoint, path/to/config.py[:arg] as for main.py: with --full the config "
    "main.py continues with (e.g. configs/swin_t.py:window=14, configs/vit_s16.py or configs/mae_tiny.py), "
    "its backbone (and an MAE's decoder) must be the checkpoint's; without, it gives a ViT's heads "
    "(e.g. configs/mae_tiny.py: 12 heads at width 192), which an MAE checkpoint needs unless it names "
    "its model",
  )
  read.add_argument(
    "--steps-per-epoch",
    type=int,
    default=None,
    help=f"with --full: optimizer steps per epoch of the run (default: ImageNet-1K, "
    f"{esvit.IMAGENET_TRAIN_EXAMPLES} // batch size)",
  )
  write = commands.add_parser("to-torch", help="export directory -> official state dict .pth")
  write.add_argument("export", help="an export directory (model.json + params/)")
  write.add_argument("out", help="the .pth file to write")
  args = parser.parse_args(argv)
  if args.command == "from-torch" and args.full:
    if not args.config:
      raise ConversionError(["--full needs --config, the config main.py will continue with."])
    if load_config(args.config).get("method") == "mae":
      written = mae.write_pretraining_workdir(
        args.checkpoint,
        args.out,
        args.config,
        steps_per_epoch=args.steps_per_epoch,
        trust_pickle=args.trust_pickle,
      )
    else:
      written = esvit.write_pretraining_checkpoint(
        args.checkpoint,
        args.out,
        args.config,
        steps_per_epoch=args.steps_per_epoch,
        image_size=args.image_size,
        trust_pickle=args.trust_pickle,
      )
    print(written)
  elif args.command == "from-torch":
    print(
      from_torch(
        args.checkpoint,
        args.out,
        key=args.key,
        image_size=args.image_size,
        config_spec=args.config,
        trust_pickle=args.trust_pickle,
      )
    )
  else:
    print(esvit.to_torch(args.export, args.out))
