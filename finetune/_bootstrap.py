"""Make `import kronos` work when these scripts run from a source checkout without `pip install`."""

from __future__ import annotations

import sys
from pathlib import Path

try:  # installed (pip install -e . / make setup): nothing to do
    import kronos  # noqa: F401
except ImportError:  # plain checkout: use ../src
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
