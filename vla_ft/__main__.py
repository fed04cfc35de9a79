"""``python -m vla_ft`` (used by torchrun: ``torchrun --nproc_per_node N -m vla_ft train RECIPE``)."""

import sys

from vla_ft.cli import main

sys.exit(main())
