"""The console a person sees: a banner, one progress line, warnings and results; the rest in WORKDIR/log.txt.

The end-to-end tests run main.py (tests/configs/tiny.py) and the demo as a user does, from the checkout's
root, once through a pseudo-terminal (the progress line rewritten in place with '\\r') and once through a
pipe (a plain line per log step, as pods and SLURM write to files).
"""

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from esvit_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", re.MULTILINE)  # absl's record prefix.
MAIN = [sys.executable, "main.py", "--config", "tests/configs/tiny.py"]


class Terminal(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self):
    return True


def run_on_pty(cmd: list[str], timeout: float) -> tuple[int, str]:
  """Runs cmd with stdout and stderr on a pseudo-terminal; returns its exit code and what it showed.

  The terminal's '\\r\\n' line ends are read back as '\\n': a '\\r' left is a rewrite in place.
  """
  primary, secondary = pty.openpty()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
  os.close(secondary)
  chunks, deadline = [], time.time() + timeout
  try:
    while True:
      ready, _, _ = select.select([primary], [], [], max(deadline - time.time(), 0))
      if not ready:
        raise TimeoutError(f"{cmd} ran past {timeout} s:\n{b''.join(chunks).decode()[-3000:]}")
      try:
        data = os.read(primary, 1 << 16)
      except OSError:  # EIO: every holder of the terminal's other end has closed it.
        break
      if not data:
        break
      chunks.append(data)
  finally:
    if proc.poll() is None:
      proc.kill()
    os.close(primary)
  return proc.wait(), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_progress_is_rewritten_in_place_on_a_terminal_and_a_line_per_update_elsewhere():
  for stream in (Terminal(), io.StringIO()):
    progress = console.Progress(total_steps=200, first_step=100, stream=stream)
    progress.start()
    progress.update(150, loss=2.5, images_per_sec=1234.4, input_wait=0.031, seconds_per_step=0.5)
    progress.show("knn", 41.26)
    progress.update(199, loss=2.0, images_per_sec=5.0, input_wait=0.0, seconds_per_step=0.5)
    progress.end_line()
    progress.end_line()
    text = stream.getvalue()
    last = "step 150/200 (75%)  loss 2.5  1,234 images/s  input wait 3%  ETA 25s  knn 41.3%"
    shown = [
      "step 100/200 (50%)  starting: the first step compiles",
      last.partition("  knn")[0],
      last,
      "step 199/200 (100%)  loss 2  5 images/s  input wait 0%  ETA 0s  knn 41.3%",
    ]
    if isinstance(stream, Terminal):
      segments = text.split("\r")
      assert text.count("\n") == 1 and text.endswith("\n") and segments[0] == ""
      assert [s.rstrip() for s in segments[1:]] == shown
      # Each rewrite covers the whole of the previous text (the last is shorter than the one before).
      for before, after in zip(segments[1:-1], segments[2:], strict=True):
        assert len(after.rstrip("\n")) >= len(before.rstrip())
    else:
      assert "\r" not in text and text.splitlines() == shown


def test_progress_right_after_the_compiling_step_shows_the_loss_alone():
  stream = io.StringIO()
  console.Progress(total_steps=10, stream=stream).update(
    1, loss=4.70376, images_per_sec=0.0, input_wait=0.0, seconds_per_step=None
  )
  assert stream.getvalue() == "step 1/10 (10%)  loss 4.704\n"


@pytest.mark.parametrize(
  "seconds, text",
  [(0.4, "0s"), (59.6, "1m00s"), (61, "1m01s"), (3599, "59m59s"), (3600 * 26 + 125, "26h02m")],
)
def test_duration(seconds, text):
  assert console.duration(seconds) == text


def test_table_right_aligns_columns():
  assert console.table(["k", "top-1"], [[10, "47.20%"], [200, "42.90%"]]).splitlines() == [
    "    k   top-1",
    "   10  47.20%",
    "  200  42.90%",
  ]


def console_lines(text: str) -> list[str]:
  """The lines a terminal keeps: for a line rewritten in place, its last text."""
  return [line.split("\r")[-1].rstrip() for line in text.rstrip("\n").split("\n")]


@pytest.mark.slow
def test_main_shows_a_banner_one_progress_line_and_results_and_logs_the_rest_to_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  # On a terminal: 3 steps, the k-NN monitor at the last.
  rc, shown = run_on_pty(
    [*MAIN, "--config.total_steps=3", "--config.eval_every_steps=3", f"--workdir={workdir}"], timeout=600
  )
  assert rc == 0, shown[-3000:]
  lines = console_lines(shown)
  assert len(lines) <= 6, shown
  assert lines[0].startswith("Pretraining tests/configs/tiny.py: 1 process x 8 cpu devices;"), shown
  assert f"log {workdir / 'log.txt'}" in lines[0]
  assert "42,646 parameters; the demo dataset, 4,000 train images" in lines[1]
  assert lines[2].strip() == "3 steps of batch 16 (0.012 epochs)"
  [progress] = [line for line in shown.split("\n") if "\rstep " in line]  # One line, rewritten in place.
  assert progress.count("\r") == 5  # Before the first step, after each of the 3, with the k-NN monitor.
  assert re.fullmatch(
    r"step 3/3 \(100%\)  loss \S+  [\d,]+ images/s  input wait \d+%  ETA 0s  knn \d+\.\d%", lines[3]
  )
  assert lines[4].startswith("Pretraining done: teacher backbone in ")
  assert not LOG_LINE.search(shown) and "orbax" not in shown.lower() and "Student parameters" not in shown

  # Through pipes, resumed in the same workdir to step 5: a plain line per log step, log.txt appended to.
  done = subprocess.run(
    [*MAIN, "--config.total_steps=5", "--config.eval_every_steps=5", f"--workdir={workdir}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "\r" not in done.stdout and len(done.stdout.splitlines()) <= 9, done.stdout
  assert "resuming after step 3" in done.stdout
  progress = [line for line in done.stdout.splitlines() if line.startswith("step ")]
  assert [line.split("  ")[0] for line in progress] == [
    "step 3/5 (60%)",
    "step 4/5 (80%)",
    "step 5/5 (100%)",
  ] + ["step 5/5 (100%)"]
  assert progress[-1].endswith("%") and " knn " in progress[-1] and " ETA " in progress[-2]
  for output in (done.stdout, done.stderr):
    assert not LOG_LINE.search(output) and "orbax" not in output.lower(), output[-3000:]

  # The detail, from both runs, is in the log file.
  log = (workdir / "log.txt").read_text()
  assert "Training from step 0 to 3." in log and "Training from step 3 to 5." in log
  assert log.index("Training from step 0 to 3.") < log.index("Training from step 3 to 5.")
  assert "Student parameters" in log
  assert len(re.findall(r"checkpoint_manager\.py:\d+\] .*Saving checkpoint at step \d", log)) >= 3
  assert re.search(r"logging_writer\.py:\d+\] \[5\] .*loss=", log)
  assert re.search(r"logging_writer\.py:\d+\] \[5\] .*knn_top1_k20=", log)


@pytest.mark.slow
def test_all_log_lines_stay_available_on_the_console_with_alsologtostderr(tmp_path):
  done = subprocess.run(
    [*MAIN, "--config.total_steps=1", "--alsologtostderr", f"--workdir={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Student parameters" in done.stderr and "Saving checkpoint at step 1" in done.stderr
  assert "Saving checkpoint at step 1" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_the_demo_on_a_terminal_fits_a_screen(tmp_path):
  # Every stage of the demo, each cut short (tests/configs/tiny.py and its task= evaluations): what the
  # console shows does not depend on the stages' length.
  demo = [sys.executable, "-m", "esvit_jax.demo", "--config", "tests/configs/tiny.py"]
  demo += ["--config.eval_every_steps=6", "--config.ckpt_every_steps=6"]  # The demo's: a save at the end.
  rc, shown = run_on_pty([*demo, f"--workdir={tmp_path}"], timeout=900)
  assert rc == 0, shown[-3000:]
  lines = console_lines(shown)
  assert len(lines) <= 40, shown
  assert lines[0].startswith("Pretraining tests/configs/tiny.py: "), shown
  for task in ("k-NN evaluation", "Linear probe"):
    [_] = [line for line in lines if line.startswith(f"{task} tests/configs/tiny.py:task=")]
  assert "pretrained - raw pixels:" in shown and lines[-1] == "=" * 100
  assert "Fine-tuning every weight (1 epochs), best top-1: from the pretrained teacher" in shown
  assert not LOG_LINE.search(shown) and "orbax" not in shown.lower() and "oneDNN" not in shown
  assert "Saving checkpoint" in (tmp_path / "log.txt").read_text()
