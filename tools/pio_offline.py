"""Prepare PlatformIO's ``tool-scons`` core package from the ``scons`` installed from PyPI, so
the emulated boards build without PlatformIO's registry. The work is done by
:mod:`tpfed.runtime.pio_offline` (which the emulated boards also run before every build); this
script runs it by hand from a checkout.

Usage: python tools/pio_offline.py [--packages-dir DIR] [--force]
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from tpfed.runtime.pio_offline import main
except ImportError:  # tpfed not installed: use the checkout's sources
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
    from tpfed.runtime.pio_offline import main

if __name__ == "__main__":
    sys.exit(main())
