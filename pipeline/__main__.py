"""``python -m pipeline`` is the ``seqcarry`` command."""
import sys

from pipeline.cli import main

sys.exit(main())
