"""`python -m esvit_jax.convert`: the converter's command line (esvit_jax.convert.command)."""

from esvit_jax import cli
from esvit_jax.convert.command import main

cli.run(main)
