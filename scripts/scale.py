#!/usr/bin/env python3
"""Drain throughput with 1, 2 and 3 consumer replicas: `python scripts/scale.py --help`
(dcmstatus/devtools/scale.py; docs/performance.md#replicas)."""

import sys

from dcmstatus.devtools.scale import main

if __name__ == "__main__":
    sys.exit(main())
