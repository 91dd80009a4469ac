"""The fault-injection loop, short: kills at random moments (some during checkpoint saves) lose nothing."""

import pytest

from benchmarks import faults


@pytest.mark.slow
def test_random_kills_and_resumes_end_in_the_uninterrupted_state(tmp_path):
  results = faults.run(kills=3, steps=12, seed=0, workdir_root=str(tmp_path))
  assert results["kills"] == 3 and results["resumes_succeeded"] == 3
  assert results["corrupt_checkpoints"] == 0
  # Checkpoints every 2 steps; a kill can also catch the next asynchronous save unfinished.
  assert results["max_steps_lost_per_kill"] <= 4
  assert results["max_loss_divergence"] <= 1e-6 and results["max_teacher_param_divergence"] <= 1e-6
