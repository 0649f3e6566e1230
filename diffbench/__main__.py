"""``python -m diffbench`` (and ``torchrun -m diffbench run ...``): the command line."""
from diffbench.cli import main

main()
