"""``python -m mmzoo``: the ``mmzoo`` command (what ``torchrun ... -m mmzoo train`` starts)."""

import sys

from mmzoo.cli import main

sys.exit(main())
