"""`python -m llava_fast.train ...` = `llava-fast train ...`; the entry point for
`torchrun --nproc-per-node N -m llava_fast.train ...`. User errors exit 2 with one line on stderr."""

import sys

from llava_fast.errors import LlavaFastError
from llava_fast.train.cli import main

try:
    sys.exit(main(sys.argv[1:]))
except LlavaFastError as e:
    print(f"llava-fast: error: {e}", file=sys.stderr)
    sys.exit(2)
