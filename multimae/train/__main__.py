"""`python -m multimae.train ...` and `torchrun --nproc_per_node N -m multimae.train ...`."""

from .cli import main

main()
