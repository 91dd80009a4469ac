"""What a person sees on the console, and the log file that keeps everything else.

The console (stdout, process 0 only) shows what runs (a headline and a few indented details), one progress
line, evaluation tables and summaries; warnings and errors reach stderr through absl. Every log record
(absl, Python logging: Orbax, TensorFlow, clu's metric lines and parameter table) goes to WORKDIR/log.txt,
appended across resumes. absl's own flags bring the detail back to the terminal: `--alsologtostderr` (all
of it, and the file too), `--logtostderr` (all of it, no file), `--stderrthreshold=info|warning|error`.

TensorFlow's C++ start-up notices are printed before TensorFlow reads TF_CPP_MIN_LOG_LEVEL's level, and
oneDNN's notice once by each of the two shared libraries that hold it (libtensorflow_framework and the
profiler plugin) on CPUs where oneDNN is on by default: importing this module first sets both variables.
TensorFlow only runs the host input pipeline (decoding, resizing), which oneDNN does not accelerate.
"""

from collections.abc import Mapping, Sequence
import io
import logging as std_logging
import os
import sys
from typing import Any, TextIO

from absl import flags, logging
from absl.logging import converter
import jax

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before anything imports TensorFlow.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

FLAGS = flags.FLAGS
LOG_FILE = "log.txt"

_log_path: str | None = None  # Where log_to_file sends the log records, for the headline.
_open_line: list["Progress"] = []  # The progress line being rewritten in place on a terminal, if any.


def is_chief() -> bool:
  """Whether this process prints to the console (process 0 of a multi-host run).

  Returns:
    True on process 0.
  """
  return jax.process_index() == 0


def log_to_file(workdir: str | os.PathLike) -> str | None:
  """Sends absl's log records to WORKDIR/log.txt (appended), leaving the console warnings and errors.

  Process i > 0 writes log.i.txt. A workdir that is not a local path (gs://...) keeps absl's own file in
  --log_dir. Without --stderrthreshold on the command line, warnings and errors still reach stderr.

  Args:
    workdir: the run's directory (created if missing).

  Returns:
    The log file's path, or None with --logtostderr (everything stays on stderr).
  """
  global _log_path
  if FLAGS["logtostderr"].value:
    return None
  if not FLAGS["stderrthreshold"].present:
    FLAGS.stderrthreshold = "warning"
  handler = logging.get_absl_handler()
  if _end_progress_line not in handler.filters:
    handler.addFilter(_end_progress_line)
  if "://" in os.fspath(workdir):
    handler.use_absl_log_file()
    _log_path = handler.python_handler.stream.name
    return _log_path
  os.makedirs(workdir, exist_ok=True)
  early = io.StringIO()  # What starting JAX's backend (for the process index, the file's name) logs.
  previous = handler.python_handler.setStream(early)
  name = LOG_FILE if is_chief() else f"log.{jax.process_index()}.txt"
  path = os.path.join(workdir, name)
  log = open(path, "a", buffering=1)  # noqa: SIM115 (open for the rest of the process)
  log.write(early.getvalue())
  handler.python_handler.setStream(log)
  if previous not in (None, sys.stderr, sys.stdout):
    previous.close()
  _log_path = path
  return path


def _shown_on_stderr(record: std_logging.LogRecord) -> bool:
  """Whether absl's handler also prints `record` on stderr (its flags' rule)."""
  threshold = converter.string_to_standard(FLAGS["stderrthreshold"].value)
  return FLAGS["alsologtostderr"].value or record.levelno >= threshold


def _end_progress_line(record: std_logging.LogRecord) -> bool:
  """A logging filter that ends an open progress line before a record is printed below it."""
  if _open_line and FLAGS.is_parsed() and _shown_on_stderr(record):
    _open_line[0].end_line()
  return True


def say(*lines: str) -> None:
  """Prints lines on the console of process 0, below the progress line if one is open.

  Args:
    *lines: the text, one line each.
  """
  if not is_chief():
    return
  if _open_line:
    _open_line[0].end_line()
  print("\n".join(lines), flush=True)


def plural(count: int, noun: str) -> str:
  """'1 device', '8 devices'.

  Args:
    count: how many.
    noun: the singular noun.

  Returns:
    The count with thousands separators and the noun, plural unless count is 1.
  """
  return f"{count:,} {noun}{'' if count == 1 else 's'}"


def headline(title: str, config_file: str | None, workdir: str | os.PathLike) -> None:
  """Prints the first line of a run's banner: what runs, from which config, where, on which devices.

  Args:
    title: the task, e.g. 'Pretraining'.
    config_file: the config file and its argument as given on the command line (None: not from a file).
    workdir: the run's directory.
  """
  source = f" {config_file}" if config_file else ""
  devices = plural(jax.local_device_count(), f"{jax.devices()[0].platform} device")
  hosts = f"{plural(jax.process_count(), 'process')} x {devices}"
  log = f"; log {_log_path}" if _log_path else ""
  say(f"{title}{source}: {hosts}; workdir {os.fspath(workdir)}{log}")


def detail(*lines: str) -> None:
  """Prints the banner's indented lines (the data, the model, the steps) under the headline.

  Args:
    *lines: the text, one line each.
  """
  say(*(f"  {line}" for line in lines))


def duration(seconds: float) -> str:
  """'45s', '12m05s', '3h07m': a time for people.

  Args:
    seconds: the time.

  Returns:
    The text, to the second below an hour and to the minute above.
  """
  seconds = max(int(round(seconds)), 0)
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
  """The run's one progress line on process 0: step / total, %, loss, images/s, input wait, ETA.

  On a terminal the line is rewritten in place at every update; elsewhere (a file, a pipe: pods and SLURM)
  each update is a line of its own. The latest value of each evaluation shown (`show`) follows the
  figures.

  Args:
    total_steps: the run's last step.
    first_step: the steps done before this run (a resume starts there).
    stream: where the line goes (default: stdout).
  """

  def __init__(self, total_steps: int, first_step: int = 0, stream: TextIO | None = None):
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.enabled = is_chief()
    self.in_place = self.enabled and self.stream.isatty()
    self._step = first_step
    self._figures = "starting: the first step compiles"
    self._evaluations: dict[str, str] = {}
    self._width = 0

  def update(
    self,
    step: int,
    *,
    loss: float,
    images_per_sec: float,
    input_wait: float,
    seconds_per_step: float | None,
  ) -> None:
    """Shows the figures of a log step.

    Args:
      step: the step just logged.
      loss: its loss.
      images_per_sec: training throughput since the previous log.
      input_wait: the fraction of that time spent waiting for input.
      seconds_per_step: training time per step since the previous log, for the ETA (None: no step ran
        since the previous log, which the first step's compilation ended: the loss alone is shown).
    """
    self._step = step
    self._figures = f"loss {loss:.4g}"
    if seconds_per_step is not None:
      eta = duration((self.total_steps - step) * seconds_per_step)
      self._figures += f"  {images_per_sec:,.0f} images/s  input wait {100 * input_wait:.0f}%  ETA {eta}"
    self._render()

  def show(self, name: str, value: float) -> None:
    """Adds (or replaces) an evaluation's latest value on the line, e.g. 'knn 41.3%', and shows it.

    Args:
      name: the evaluation's name.
      value: its figure, in %.
    """
    self._evaluations[name] = f"{value:.1f}%"
    self._render()

  def text(self) -> str:
    """The line's current text.

    Returns:
      'step s/total (p%)  figures  evaluations'.
    """
    percent = 100 * self._step / max(self.total_steps, 1)
    evaluations = "".join(f"  {name} {value}" for name, value in self._evaluations.items())
    return f"step {self._step:,}/{self.total_steps:,} ({percent:.0f}%)  {self._figures}{evaluations}"

  def start(self) -> None:
    """Shows the line before the first step (which compiles)."""
    self._render()

  def _render(self) -> None:
    if not self.enabled:
      return
    text = self.text()
    if not self.in_place:
      print(text, file=self.stream, flush=True)
      return
    self.stream.write("\r" + text.ljust(self._width))
    self.stream.flush()
    self._width = len(text)
    if self not in _open_line:
      _open_line.append(self)

  def end_line(self) -> None:
    """Ends the line being rewritten (before other output, and when the run ends); idempotent."""
    if self in _open_line:
      _open_line.remove(self)
      self.stream.write("\n")
      self.stream.flush()
      self._width = 0


def table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 2) -> str:
  """A plain text table, columns right-aligned, for evaluation results on the console.

  Args:
    header: column titles.
    rows: one sequence of cells per row, printed with str().
    indent: spaces before each line.

  Returns:
    The table as text (header, then rows).
  """
  cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)
  return "\n".join(" " * indent + line for line in lines)


def summary(title: str, lines: Sequence[str]) -> None:
  """Prints a run's final summary between two rules, on process 0.

  Args:
    title: its first line.
    lines: the rest.
  """
  rule = "=" * 100
  say(rule, title, *lines, rule)


def fields_table(fields: Mapping[str, Any], digits: int = 3) -> str:
  """A two-column name / value table of a flat dict, for results and benchmarks printed to a terminal.

  Args:
    fields: name -> value (None prints as n/a).
    digits: decimals of float values.

  Returns:
    The table as text, one line per field under a header.
  """

  def shown(value):
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

  width = max(map(len, fields), default=5)
  lines = [f"{'field':<{width}}  value", f"{'-' * width}  -----"]
  return "\n".join(lines + [f"{name:<{width}}  {shown(value)}" for name, value in fields.items()])


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A Markdown table (numbers right-aligned), ready to paste into BENCHMARKS.md.

  Args:
    header: column titles.
    rows: one list of cells per row; cells are printed with str().

  Returns:
    The table as text.
  """
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(t) + 1) + ":" for t in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])
