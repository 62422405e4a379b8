"""`python -m tests.support.run_daemon`: hypervisord with the engine's test job kinds added."""
import sys

from hypersdk.service.daemon import main

from . import test_kinds  # noqa: F401  (registers the test-only kinds)

sys.exit(main())
