"""The seed's `from config import Config`: the one typed configuration of the whole pipeline.

Defaults are the official fine-tuning values; override any subset with a JSON/YAML file:
`Config.from_file("my.json")`. See README "Configuration".
"""

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos.config import Config

__all__ = ["Config"]
