"""Loading a pretrained backbone needs the backbone alone: from a workdir's checkpoint (the teacher's backbone
is read by itself) or from an export directory, with the optimizer, schedules, train step and optax
unimportable."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import checkpointing, errors, export, sharding, train_step
from tests.configs import tiny
from tests.test_train import ROOT

BLOCKED = ("optax", "esvit_jax.optim", "esvit_jax.schedules", "esvit_jax.train_step")
# Runs in a fresh interpreter: every import of a blocked module raises, then both kinds of path are loaded
# and the parameters saved for the test to compare.
LOADER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}

class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name in BLOCKED or name.startswith("optax."):
      raise ImportError(f"{{name}} is blocked in this test")

sys.meta_path.insert(0, Blocker())
import jax, numpy as np, esvit_jax
for path, out in zip(sys.argv[1::2], sys.argv[2::2]):
  model, params = esvit_jax.load_pretrained(path)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  np.savez(out, **{{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}})
loaded = sorted(m for m in sys.modules if m in BLOCKED or m.startswith("optax"))
assert not loaded, loaded
print("loaded", type(model).__name__)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pretraining workdir as the loop writes it: config.json, checkpoints of the whole train state at steps
  1 and 2 (different teachers) and the export; no train step is compiled (tests/test_vit.py runs the loop)."""
  path = tmp_path_factory.mktemp("pretrain")
  config = tiny.get_config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), steps_per_epoch=4)
  checkpointer = checkpointing.Checkpointer(path)
  for step in (1, 2):
    state = state.replace(
      step=jnp.asarray(step, jnp.int32), teacher_params=jax.tree.map(lambda x: x + 1, state.teacher_params)
    )
    meta = {"input_position": step, "config": config.to_json_best_effort()}
    checkpointer.save(step, state, meta, force=True)
  checkpointer.wait()
  checkpointer.close()
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  backbone = train_step.build_model(config).backbone
  export.save_backbone(path / "export", backbone, state.teacher_params["backbone"])
  return path, jax.device_get(state.teacher_params["backbone"])


def flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_load_pretrained_without_optimizer_schedules_or_optax(workdir, tmp_path):
  path, teacher = workdir
  outs = [str(tmp_path / "workdir.npz"), str(tmp_path / "export.npz")]
  done = subprocess.run(
    [sys.executable, "-c", LOADER, str(path), outs[0], str(path / "export"), outs[1]],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "loaded SwinTransformer" in done.stdout
  for out in outs:
    loaded = dict(np.load(out))
    assert loaded.keys() == flat(teacher).keys()
    for key, value in flat(teacher).items():
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.mark.slow
def test_blocker_really_blocks():
  """The guard of the test above makes `import esvit_jax.train_step` fail (so its pass means something)."""
  code = LOADER.split("import jax, numpy")[0] + "import esvit_jax.train_step\n"
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "is blocked in this test" in done.stderr


def test_earlier_step_and_missing_step(workdir):
  path, teacher = workdir
  model, latest = export.load_pretrained(path)
  _, first = export.teacher_from_workdir(path, step=1)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(latest), teacher)
  pairs = zip(jax.tree.leaves(first), jax.tree.leaves(teacher), strict=True)
  assert any(not np.array_equal(a, b) for a, b in pairs)
  assert model.drop_path_rate == 0.0
  with pytest.raises(errors.UserError, match="no checkpoint of step 7"):
    export.teacher_from_workdir(path, step=7)


def test_export_cli_writes_the_teacher(workdir, tmp_path):
  path, teacher = workdir
  export.main([str(path), str(tmp_path / "out"), "--step", "2"])
  _, params = export.load_backbone(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), teacher)
