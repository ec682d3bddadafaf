"""`python -m llava_fast.train ...` = `llava-fast train ...`; the entry point for
`torchrun --nproc-per-node N -m llava_fast.train ...`. User errors exit 2 with one line on stderr."""

import sys

from llava_fast.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
