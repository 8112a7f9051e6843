"""``python -m storvisor.testing.crashkit``: the worker program (see ``worker``)."""

import sys

from storvisor.testing.crashkit.worker import main

sys.exit(main())
