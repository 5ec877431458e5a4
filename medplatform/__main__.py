"""Entry point of ``python -m medplatform`` (see ``medplatform.cli``)."""

import sys

from medplatform.cli import main

sys.exit(main())
