"""The fault-injection loop, short: kills at drawn steps (some during checkpoint saves) lose nothing, and a
run too short for the kills asked (the tool used to need 4 steps a kill) still takes every one of them."""

import pytest

from benchmarks import faults


@pytest.mark.slow
def test_every_kill_lands_on_a_short_run_and_it_ends_in_the_uninterrupted_state(tmp_path):
  results = faults.run(kills=3, steps=4, seed=0, workdir_root=str(tmp_path))
  assert results["kills"] == 3 and results["resumes_succeeded"] == 3
  assert results["corrupt_checkpoints"] == 0
  # Checkpoints every 2 steps; a kill can also catch the next asynchronous save unfinished.
  assert results["max_steps_lost_per_kill"] <= 2 * faults.CKPT_EVERY
  assert results["max_loss_divergence"] <= 1e-6 and results["max_teacher_param_divergence"] <= 1e-6


def fake_results(kills: int, divergence: float) -> dict:
  return {
    "kills": kills,
    "corrupt_checkpoints": 0,
    "max_loss_divergence": divergence,
    "max_teacher_param_divergence": 0.0,
  }


@pytest.mark.parametrize(
  "kills, divergence, code", [(3, 0.0, 0), (2, 0.0, 1), (3, 1e-3, 1)], ids=["all", "fewer", "diverged"]
)
def test_the_tool_says_how_many_kills_landed_and_fails_when_fewer_or_diverged(
  monkeypatch, capsys, kills, divergence, code
):
  monkeypatch.setattr(faults, "run", lambda *args, **kwargs: fake_results(kills, divergence))
  monkeypatch.setattr("sys.argv", ["faults.py", "--kills", "3"])
  with pytest.raises(SystemExit) as exit_info:
    faults.main()
  assert exit_info.value.code == code
  assert f"kills landed: {kills} of 3" in capsys.readouterr().out
