"""`python -m dcmstatus`: the same as the `dcmstatus` command."""

import sys

from dcmstatus.cli.commands import main

sys.exit(main())
