#!/usr/bin/env python3
"""Benchmark of dcmstatus: `python scripts/bench.py --help` (same as `dcmstatus bench`)."""

import sys

from dcmstatus.devtools.bench import main

if __name__ == "__main__":
    sys.exit(main())
