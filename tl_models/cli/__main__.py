"""`python -m tl_models.cli`: the `tl-models` command."""

from . import console

console()
