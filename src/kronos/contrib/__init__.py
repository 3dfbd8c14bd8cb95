"""Bridges to other toolkits. Each module needs its toolkit installed and is imported only when asked for:

- :mod:`kronos.contrib.qlib`: a Qlib data handler of raw daily bars and ``KronosModel``, a Qlib model that
  finetunes and forecasts with this package (``pip install 'kronos-kline[qlib]'``); run by ``qrun`` through
  ``examples/qlib/workflow_config_kronos.yaml``.
"""
