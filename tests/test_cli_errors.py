"""A user's mistake ends main.py and the `python -m esvit_jax.*` tools with its message and exit code 2,
without a traceback; a bug keeps its traceback."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from esvit_jax import checkpointing, cli, convert, errors, export, sharding, visualize
from esvit_jax.configs import common, linear_probe
from esvit_jax.configs import knn as knn_config
from esvit_jax.data import multicrop, sources
from esvit_jax.evaluate import knn, linear
from esvit_jax.models import swin, vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=tests/configs/tiny.py"


def test_a_user_error_is_its_message_alone_and_exit_code_2(capsys):
  def main(argv):
    raise errors.NotFoundError(f"{argv[0]} does not exist.")

  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, ["/no/such/checkpoint"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "/no/such/checkpoint does not exist.\n"


def test_other_exceptions_pass_through_unchanged():
  def main(argv):
    raise FileNotFoundError(argv)  # A bug: our code opened a file that the user did not name.

  with pytest.raises(FileNotFoundError):
    cli.run(main, ["x"])
  assert cli.run(lambda argv: argv, ["y"]) == ["y"]


def run(cmd, tmp_path) -> subprocess.CompletedProcess:
  return subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)}
  )


def assert_user_error(done: subprocess.CompletedProcess, message: str):
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
  assert message in done.stderr.strip().splitlines()[-1], done.stderr[-3000:]  # Last, after the logs.


@pytest.mark.slow
@pytest.mark.parametrize(
  "flags,message",
  [
    ([TINY, "--config.batch_size=12"], "config.batch_size=12 must be divisible by the 8 devices"),
    ([TINY, "--config.model.backbone=swin_huge"], "'swin_huge' is unknown"),
    ([TINY, "--config.task=segment"], "config.task='segment' is unknown"),
    ([TINY, "--config.dataset=folder:/no/such/dir"], "/no/such/dir"),
    (["--config=/no/such/config.py:arg"], "--config /no/such/config.py: no such file."),
    (["--config=configs/knn.py", "--config.pretrained=/no/such/export"], "/no/such/export is neither"),
  ],
  ids=[
    "bad-config-value",
    "unknown-backbone",
    "unknown-task",
    "missing-dataset",
    "missing-config-file",
    "missing-checkpoint",
  ],
)
def test_main_ends_a_user_error_with_its_message_and_exit_code_2(flags, message, tmp_path):
  assert_user_error(
    run([sys.executable, "main.py", *flags, f"--workdir={tmp_path / 'run'}"], tmp_path), message
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "error,code", [("errors.NotFoundError('no such checkpoint')", 2), ("ZeroDivisionError('a bug')", 1)]
)
def test_main_keeps_the_traceback_of_a_bug(error, code, tmp_path):
  """The same failure point (the task) raising a user error or a bug: only the type decides."""
  script = (
    "import runpy, sys\n"
    "from esvit_jax import errors, tasks\n"
    "def run(config, workdir, config_file=None):\n"
    f"  raise {error}\n"
    "tasks.run = run\n"
    f"sys.argv = ['main.py', '--config', 'tests/configs/tiny.py', '--workdir', {str(tmp_path)!r}]\n"
    "runpy.run_path('main.py', run_name='__main__')\n"
  )
  done = run([sys.executable, "-c", script], tmp_path)
  assert done.returncode == code, done.stderr[-3000:]
  if code == 2:
    assert_user_error(done, "no such checkpoint")
  else:
    assert "Traceback (most recent call last)" in done.stderr and "ZeroDivisionError: a bug" in done.stderr


@pytest.mark.slow
def test_tools_end_a_user_error_with_its_message_and_exit_code_2(tmp_path):
  no_export = str(tmp_path / "no_export")
  assert_user_error(
    run(
      [
        sys.executable,
        "-m",
        "esvit_jax.visualize",
        "--pretrained",
        no_export,
        "--image",
        "x.jpg",
        "--out",
        str(tmp_path),
      ],
      tmp_path,
    ),
    "is neither an exported backbone (with model.json) nor a pretraining workdir",
  )
  assert_user_error(
    run(
      [sys.executable, "-m", "esvit_jax.convert", "to-torch", no_export, str(tmp_path / "out.pth")], tmp_path
    ),
    "is not an exported backbone",
  )
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": {}}))
  assert_user_error(
    run([sys.executable, "-m", "esvit_jax.export", str(workdir), str(tmp_path / "out")], tmp_path),
    "holds no checkpoint",
  )


@pytest.mark.slow
def test_main_ends_a_bad_config_argument_or_an_unknown_flag_with_exit_code_2(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(
    "from esvit_jax import errors\n\n\n"
    "def get_config(arg=None):\n"
    "  raise errors.UserError(f'Unknown config argument {arg!r}.')\n"
  )
  workdir = f"--workdir={tmp_path / 'run'}"
  assert_user_error(
    run([sys.executable, "main.py", f"--config={config}:windw=14", workdir], tmp_path),
    "Unknown config argument 'windw=14'.",
  )
  done = run(
    [sys.executable, "main.py", "--config=tests/configs/tiny.py", "--no_such_flag=1", workdir], tmp_path
  )
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert "Unknown command line flag 'no_such_flag'" in done.stderr


@pytest.mark.slow
def test_main_ends_an_override_of_a_missing_config_field_with_exit_code_2(tmp_path):
  workdir = f"--workdir={tmp_path / 'run'}"
  for override, field in [("config.no_such_field", "no_such_field"), ("config.model.no_such", "no_such")]:
    done = run([sys.executable, "main.py", TINY, f"--{override}=1", workdir], tmp_path)
    assert_user_error(done, f"--{override}: the config has no field '{field}'")
  config = tmp_path / "config.py"
  config.write_text("def get_config(arg=None):\n  return {}.model\n")  # A bug: the same exception type.
  done = run([sys.executable, "main.py", f"--config={config}", "--config.no_such=1", workdir], tmp_path)
  assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr, done.stderr[-3000:]
  assert "AttributeError: 'dict' object has no attribute 'model'" in done.stderr


def test_config_file_arguments_are_user_errors():
  with pytest.raises(errors.UserError, match=r"Unknown config argument 'windw'; known: \['window'\]"):
    common.parse_arg("windw=14", window=7)
  with pytest.raises(errors.UserError, match="Config argument window='abc' is not of type int."):
    common.parse_arg("window=abc", window=7)


def test_evaluations_without_a_pretrained_backbone_are_user_errors(tmp_path):
  with pytest.raises(errors.UserError, match="Set --config.pretrained"):
    knn.run(knn_config.get_config(), str(tmp_path / "knn"))
  with pytest.raises(errors.UserError, match="Set --config.pretrained"):
    linear.train_and_evaluate(linear_probe.get_config(), str(tmp_path / "linear"))


def test_export_names_what_a_workdir_lacks_and_creates_nothing(tmp_path, capsys):
  no_workdir = tmp_path / "no_such"
  with pytest.raises(SystemExit) as exit_info:
    cli.run(export.main, [str(no_workdir), str(tmp_path / "out")])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
    f"{no_workdir} is not a pretraining workdir: {no_workdir / 'config.json'} is missing (main.py writes it "
    "with the checkpoints in the --workdir of a pretraining run).\n"
  )
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": {}}))
  with pytest.raises(errors.NotFoundError, match="holds no checkpoint to take a teacher from: .* is missing"):
    export.teacher_from_workdir(workdir)
  assert sorted(os.listdir(workdir)) == ["config.json"] and not no_workdir.exists()


def test_converter_errors_are_user_errors(tmp_path, capsys, monkeypatch):
  with pytest.raises(SystemExit) as exit_info:
    cli.run(convert.main, ["from-torch", str(tmp_path / "ckpt.pth"), str(tmp_path / "out"), "--full"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
    "Cannot convert the checkpoint:\n  --full needs --config, the config main.py will continue with.\n"
  )
  with pytest.raises(errors.UserError, match=r"Unknown parts \['head'\]"):
    convert.to_state_dict({"head": {}})
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(errors.UserError, match="pip install torch") as failure:
    convert.main(["to-torch", str(tmp_path / "export"), str(tmp_path / "out.pth")])
  assert isinstance(failure.value, ImportError)


def test_visualize_bad_query_or_image_are_user_errors(tmp_path):
  assert visualize.query_index(48, 7) == 48
  for query in (49, -1, "centre"):
    with pytest.raises(errors.UserError, match=r"a token index in \[0, 49\), not"):
      visualize.query_index(query, 7)
  with pytest.raises(errors.NotFoundError, match="no such image file"):
    visualize.load_image(tmp_path / "none.jpg", 32)
  (tmp_path / "notes.jpg").write_text("not an image")
  with pytest.raises(errors.UserError, match="is not an image that Pillow reads"):
    visualize.load_image(tmp_path / "notes.jpg", 32)


def test_config_values_the_models_and_data_refuse_are_user_errors():
  def init(model, side):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))

  with pytest.raises(errors.UserError, match="Unknown sharding strategy 'zero3'"):
    sharding.infer_shardings({}, sharding.make_mesh(), "zero3")
  with pytest.raises(errors.UserError, match="10 examples, fewer than one batch of 16"):
    multicrop.steps_per_epoch(ml_collections.ConfigDict({"batch_size": 16}), 10)
  with pytest.raises(errors.UserError, match="Batch size 16 does not split over 3 processes"):
    multicrop.host_batch_size(16, sources.HostShard(process_index=0, process_count=3))
  with pytest.raises(errors.UserError, match="image_size=8 is too small for 4 stages of patch 4"):
    swin.block_windows(8, 4, (2, 2, 2, 2), 7)
  tiny_swin = dict(embed_dim=8, window_size=2, image_size=8)
  with pytest.raises(errors.UserError, match="differ in length"):
    init(swin.SwinTransformer(depths=(1, 1), num_heads=(1,), **tiny_swin), 8)
  with pytest.raises(errors.UserError, match="square NHWC images of at least 4px"):
    init(swin.SwinTransformer(depths=(1,), num_heads=(1,), **tiny_swin), 2)
  tiny_vit = dict(embed_dim=8, depth=1, num_heads=1, patch_size=4)
  with pytest.raises(errors.UserError, match="image_size=30 is not a multiple of patch_size=4"):
    init(vit.VisionTransformer(image_size=30, **tiny_vit), 32)
  with pytest.raises(errors.UserError, match="whose side is a multiple of 4"):
    init(vit.VisionTransformer(image_size=32, **tiny_vit), 30)
  with pytest.raises(errors.UserError, match="choose another input size"):  # 3x3 -> 31x31 gives 30x30.
    vit.interpolate_pos_embed(jnp.zeros((1, 1 + 9, 8)), 31 * 31)


def test_a_workdir_in_use_is_a_user_error(tmp_path):
  with checkpointing.workdir_lock(tmp_path):
    with pytest.raises(errors.UserError, match="Another run is using workdir") as failure:
      with checkpointing.workdir_lock(tmp_path):
        pass
  assert isinstance(failure.value, RuntimeError)
