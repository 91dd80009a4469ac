"""The mutation check of docs/fidelity.md (tests/mutants.py): every row names mutants that apply, and the
mutants of the behaviours that once survived every test are killed. `make mutants` runs all of them."""

import pytest

from tests import mutants

# Behaviours whose mutants survived the whole suite before their tests were strengthened, and one mutant of
# each: every mutant costs a pytest process (`make mutants` runs them all).
ONCE_SURVIVED = {
  "Patch embedding: a 4x4": "epsilon=1e-6",
  "Per-crop probabilities: blur 1.0": "GLOBAL_BLUR_PROB",
  "multicrop output": "sample_crop_boxes",
}


def test_every_fidelity_row_names_mutants_that_change_exactly_one_place():
  rows = mutants.read_rows()
  assert len(rows) > 70, "docs/fidelity.md should list the behaviours we reproduce"
  assert mutants.problems(rows) == []


def test_a_mutant_applies_once_and_a_missing_or_repeated_text_is_reported(tmp_path):
  (tmp_path / "m.py").write_text("EPS = 1e-6\nA = 1\nA = 1\n")
  ok, repeated, absent = (mutants.Mutant("m.py", b, "X") for b in ("EPS = 1e-6", "A = 1", "B = 2"))
  rows = [
    mutants.Row(1, "behaviour", ("tests/test_x.py::test_y",), (ok, repeated, absent)),
    mutants.Row(2, "bare", ("t",), ()),
  ]
  found = mutants.problems(rows, root=tmp_path)
  assert len(found) == 3
  assert "found 2 times" in found[0] and "found 0 times" in found[1] and "no mutant" in found[2]


@pytest.mark.slow
def test_mutants_that_once_survived_are_killed(capsys):
  code = mutants.main(
    [arg for row, mutant in ONCE_SURVIVED.items() for arg in ("--match", row, "--mutant", mutant)]
  )
  out = capsys.readouterr().out
  assert code == 0, out
  assert "mutants: 3 killed, 0 survived, 0 errors of 3 (3 rows)" in out, out
