"""Sina Finance K-line source: a small HTTP client and the ``sina`` data processor.

Sina serves A-share K-lines (``sh``/``sz``/``bj`` symbols) from two twin endpoints that take the same query
``?symbol=sh600000&scale=240&ma=no&datalen=1023``:

* JSONP (default, ``sina_base_url``): ``.../jsonp_v2.php/=/CN_MarketDataService.getKLineData``;
* plain JSON: ``.../json_v2.php/CN_MarketData.getKLineData``.

:mod:`.parser` reads symbols and response bodies, :mod:`.client` fetches them over HTTP (deadlines, size limits,
retries), :mod:`.processor` is the ``sina`` data source that downloads, caches and loads them.
"""

from kronos.data.sources.sina.client import DEFAULT_HEADERS, SINA_JSON_URL, SINA_JSONP_URL, SINA_SCALES, SinaClient
from kronos.data.sources.sina.parser import fill_missing_amount, normalize_symbol, normalize_symbols, parse_kline_body
from kronos.data.sources.sina.processor import SinaDataProcessor, default_cache_dir

__all__ = [
    "DEFAULT_HEADERS",
    "SINA_JSONP_URL",
    "SINA_JSON_URL",
    "SINA_SCALES",
    "SinaClient",
    "SinaDataProcessor",
    "default_cache_dir",
    "fill_missing_amount",
    "normalize_symbol",
    "normalize_symbols",
    "parse_kline_body",
]
