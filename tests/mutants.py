r"""The mutation check of docs/fidelity.md: every documented behaviour, broken on purpose, fails its tests.

  python tests/mutants.py                      # every mutant of every row (`make mutants`)
  python tests/mutants.py --match eps --match Per-crop   # rows whose behaviour text holds one of these
  python tests/mutants.py --match Per-crop --mutant LOCAL_BLUR   # of those rows, the mutants holding this
  python tests/mutants.py --list               # the rows and their mutants, nothing run

Each row of the fidelity tables is `| behaviour | tests | mutants |`. A mutant is written
`` `path/file.py`: `before` → `after` `` (several in one cell are separated by `<br>`; `\|` stands for
`|`): the text `before`, which must occur exactly once in the file, becomes `after`. For every mutant the
check copies the checkout once into a temporary directory, applies the one change there (the working tree
is never touched, so it is safe while other tests run), runs the row's tests in the copy with pytest, and
restores the file. A mutant is killed when a test fails, survived when all pass; anything else (a
collection error, a test that cannot start) is an error. The exit code is 0 only when every mutant is
killed.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIDELITY = ROOT / "docs" / "fidelity.md"
CITED_TEST = re.compile(r"(test_\w+\.py)::(test_\w+)")
MUTANT = re.compile(r"`([\w./-]+\.py)`: `([^`]+)` → `([^`]*)`")
SEPARATOR = re.compile(r"(?<!\\)\|")
NOT_COPIED = (
  ".git",
  ".venv",
  "demo_workdir",
  "workdirs",
  "build",
  "dist",
  "__pycache__",
  "*.egg-info",
  ".whl",
)


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One deliberate change: `before` (found exactly once in `path`, relative to the root) becomes `after`."""

  path: str
  before: str
  after: str

  def __str__(self) -> str:
    return f"{self.path}: {self.before!r} -> {self.after!r}"


@dataclasses.dataclass(frozen=True)
class Row:
  """A row of the fidelity tables: the behaviour, the tests that guard it and the mutants they must kill."""

  line: int
  behaviour: str
  tests: tuple[str, ...]
  mutants: tuple[Mutant, ...]


def _cells(line: str) -> list[str]:
  return [cell.strip().replace("\\|", "|") for cell in SEPARATOR.split(line.strip().strip("|"))]


def read_rows(path: pathlib.Path = FIDELITY) -> list[Row]:
  """The rows of every table of the fidelity document (header and rule lines left out).

  Args:
    path: the Markdown document.

  Returns:
    One Row per table row, in the document's order; a row without a mutant cell has no mutants.
  """
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.startswith("|") or set(line) <= set("|-: "):
      continue
    cells = _cells(line)
    tests = tuple(
      f"tests/{file}::{name}" for file, name in CITED_TEST.findall(cells[1] if len(cells) > 1 else "")
    )
    if not tests:  # A header row.
      continue
    mutants = tuple(Mutant(*m) for m in MUTANT.findall(cells[2])) if len(cells) > 2 else ()
    rows.append(Row(number, cells[0], tests, mutants))
  return rows


def problems(rows: list[Row], root: pathlib.Path = ROOT) -> list[str]:
  """What makes the table unusable as a mutation check: rows without mutants, mutants that do not apply.

  Args:
    rows: the rows read by read_rows.
    root: the checkout the mutants' paths are relative to.

  Returns:
    One message per problem; empty when every row has mutants that each change exactly one place.
  """
  found = []
  for row in rows:
    if not row.mutants:
      found.append(f"line {row.line}: no mutant for {row.behaviour[:60]!r}")
    for mutant in row.mutants:
      file = root / mutant.path
      count = file.read_text().count(mutant.before) if file.is_file() else -1
      if count != 1 or mutant.before == mutant.after:
        what = "no such file" if count < 0 else f"found {count} times" if count != 1 else "changes nothing"
        found.append(f"line {row.line}: {mutant}: {what}")
  return found


def copy_checkout(destination: pathlib.Path) -> pathlib.Path:
  """Copies the checkout's files (not its environment, history or outputs) under destination.

  Args:
    destination: an empty temporary directory.

  Returns:
    The copy's root.
  """
  copy = destination / "checkout"
  shutil.copytree(ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
  return copy


def run_mutant(copy: pathlib.Path, mutant: Mutant, tests: tuple[str, ...], timeout: int) -> tuple[str, str]:
  """Applies one mutant in the copy, runs the tests there, and restores the file.

  Args:
    copy: the checkout's copy.
    mutant: the change to apply.
    tests: pytest node ids relative to the root.
    timeout: seconds allowed to each test.

  Returns:
    ('killed' | 'survived' | 'error', the tail of pytest's output).
  """
  file = copy / mutant.path
  original = file.read_text()
  file.write_text(original.replace(mutant.before, mutant.after, 1))
  # The copy's package must be the one imported, also by the processes that tests start.
  env = {**os.environ, "PYTHONPATH": str(copy)}
  command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-x", "-q"]
  command += [f"--timeout={timeout}", *tests]
  try:
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, check=False)
  finally:
    file.write_text(original)
  outcome = {0: "survived", 1: "killed"}.get(result.returncode, "error")
  return outcome, "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])


def _with_mutants_holding(row: Row, texts: list[str]) -> Row:
  """The row with only the mutants whose text holds one of texts."""
  kept = tuple(m for m in row.mutants if any(text in str(m) for text in texts))
  return dataclasses.replace(row, mutants=kept)


def main(argv: list[str] | None = None) -> int:
  """Runs the selected mutants and prints killed / survived per row.

  Args:
    argv: command-line arguments (None: sys.argv[1:]).

  Returns:
    The exit code: 0 when every mutant run was killed, 1 otherwise.
  """
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--match", action="append", default=[], help="Only rows whose behaviour holds this text."
  )
  parser.add_argument(
    "--mutant", action="append", default=[], help="Only mutants whose `path: 'before' -> 'after'` holds this."
  )
  parser.add_argument("--list", action="store_true", help="List the rows and their mutants; run nothing.")
  parser.add_argument("--timeout", type=int, default=600, help="Seconds allowed to each test.")
  args = parser.parse_args(argv)
  rows = read_rows()
  if args.match:
    rows = [r for r in rows if any(m.lower() in r.behaviour.lower() for m in args.match)]
  if not rows:
    print(f"no row of {FIDELITY.relative_to(ROOT)} matches {args.match}", file=sys.stderr)
    return 1
  broken = problems(rows)
  if broken:
    print("\n".join(broken), file=sys.stderr)
    return 1
  if args.mutant:
    rows = [_with_mutants_holding(row, args.mutant) for row in rows]
    rows = [row for row in rows if row.mutants]
    if not rows:
      print(f"no mutant of the rows matched holds any of {args.mutant}", file=sys.stderr)
      return 1
  if args.list:
    for row in rows:
      print(f"line {row.line}: {row.behaviour[:100]}\n  tests: {' '.join(row.tests)}")
      print("".join(f"  mutant: {mutant}\n" for mutant in row.mutants), end="")
    return 0
  total = sum(len(row.mutants) for row in rows)
  outcomes = []
  start = time.time()
  with tempfile.TemporaryDirectory(prefix="esvit_jax_mutants_") as tmp:
    copy = copy_checkout(pathlib.Path(tmp))
    for row in rows:
      print(f"line {row.line}: {row.behaviour[:100]}", flush=True)
      for mutant in row.mutants:
        outcome, tail = run_mutant(copy, mutant, row.tests, args.timeout)
        outcomes.append(outcome)
        print(f"  [{len(outcomes)}/{total}] {outcome:8s} {mutant}", flush=True)
        if outcome != "killed":
          print("    " + tail.replace("\n", "\n    "), flush=True)
  killed = outcomes.count("killed")
  print(
    f"mutants: {killed} killed, {outcomes.count('survived')} survived, {outcomes.count('error')} errors "
    f"of {total} ({len(rows)} rows) in {(time.time() - start) / 60:.1f} min"
  )
  return 0 if killed == total else 1


if __name__ == "__main__":
  sys.exit(main())
