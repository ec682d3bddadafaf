import sys

from llava_fast.cli import main

sys.exit(main())
