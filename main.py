r"""esvit-jax entry point: every host of a pod or cluster runs the same command.

  python main.py --config configs/swin_t.py --workdir DIR                 # pretrain
  python main.py --config configs/swin_t.py:window=14 --config.batch_size=1024 --workdir DIR
  python main.py --config configs/knn.py --config.pretrained=PATH --workdir DIR
  python main.py --config configs/linear_probe.py --config.pretrained=PATH --workdir DIR
  python main.py --config configs/finetune.py --config.pretrained=PATH --workdir DIR

A user's mistake (a bad flag or config value, a missing dataset or checkpoint) ends the run with its
message and exit code 2; any other failure is a bug and shows its traceback.

The console shows what runs, one progress line, warnings and results; every log line (absl INFO: metrics,
Orbax, TensorFlow) goes to WORKDIR/log.txt. --alsologtostderr shows them on the console too.

Multi-host: pass --distributed (the launch/ scripts do) to join JAX's multi-controller runtime; the
coordinator is found from the TPU or SLURM environment, or given with --coordinator_address,
--num_processes and --process_id.
"""

import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from esvit_jax import cli, console, errors  # console quiets TensorFlow's C++ notices before its import.

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here (local path or gs://).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, when not auto-detected.")
flags.DEFINE_integer("num_processes", None, "Number of processes, when not auto-detected.")
flags.DEFINE_integer("process_id", None, "This process's index, when not auto-detected.")
config_flags.DEFINE_config_file(
  "config", None, "A config file, e.g. configs/swin_t.py[:arg].", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


@cli.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=cli.USER_ERROR_EXIT_CODE)
  config_file = config_flags.get_config_filename(FLAGS["config"])
  if not os.path.isfile(config_file.split(":")[0]):  # config_flags would only fail later, with a traceback.
    raise errors.NotFoundError(f"--config {config_file.split(':')[0]}: no such file.")
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  console.log_to_file(FLAGS.workdir)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerator memory to JAX.
  logging.info(
    "Process %d of %d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )

  from esvit_jax import tasks  # pylint: disable=g-import-not-at-top

  tasks.run(FLAGS.config, FLAGS.workdir, config_file)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
