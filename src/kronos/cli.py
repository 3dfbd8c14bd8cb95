"""The ``kronos`` command: every pipeline step over one config.

Examples::

    kronos pipeline --config-path examples/configs/demo.json --cpu --fast-mode
    kronos data --config-path my.json --data-source csv
    kronos train-tokenizer --config-path my.json
    torchrun --standalone --nproc_per_node=4 -m kronos.cli train-predictor --config-path my.json
    kronos predict --config-path my.json
    kronos forecast --input my_klines.csv --tokenizer ./Kronos-Tokenizer-base --model ./Kronos-small --pred-len 24
    kronos config --config-path my.json          # print the effective config
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kronos.config import Config
from kronos.errors import ConfigError, KronosError

log = logging.getLogger("kronos")

EPILOG = """examples:
  kronos pipeline --config-path examples/configs/demo.json --cpu --fast-mode
  kronos data --config-path my.json --data-source csv --set csv_data_path=./my_klines/
  kronos train-tokenizer --config-path my.json --resume
  torchrun --standalone --nproc_per_node=4 -m kronos.cli train-predictor --config-path my.json
  kronos predict --config-path my.json
  kronos forecast --input my_klines.csv --tokenizer ./Kronos-Tokenizer-base --model ./Kronos-small --pred-len 24
  kronos config --config-path my.json
  kronos serve --run outputs            # REST API, MCP at /mcp, web page at http://127.0.0.1:8000/
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every flag's help ends with its default unless it says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or action.required
            or default is argparse.SUPPRESS
            or default is None
            or default is False
            or default in ("", [])
            or not action.option_strings
        ):  # (0 == False: `is`)
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line ``error: ...`` on stderr and exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"error: {self.prog}: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config-path",
        metavar="PATH",
        help="JSON or YAML file overriding any subset of Config's keys; default: "
        "the built-in defaults (`kronos config` prints them)",
    )
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is available")
    p.add_argument("--fast-mode", action="store_true", help="few epochs and batches: the whole pipeline in minutes")
    p.add_argument(
        "--data-source",
        metavar="NAME",
        help="qlib, sina, csv, ccxt or a registered custom source; default: the config's data_source (qlib)",
    )
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config key (VALUE parsed as JSON when possible); repeatable",
    )


def build_config(args: argparse.Namespace) -> Config:
    """Config from defaults, the --config-path file, --set overrides and the flags (in that order)."""
    from kronos.config import apply_fast_mode

    config = Config.from_file(args.config_path) if args.config_path else Config()
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    if args.data_source:
        overrides["data_source"] = args.data_source
    if args.cpu:
        overrides["device"] = "cpu"
    if overrides:
        config.update(overrides, source="command line")
    if args.fast_mode:
        from kronos.config import load_overrides

        explicit = set(overrides)
        if args.config_path:
            explicit |= set(load_overrides(args.config_path))
        apply_fast_mode(config, explicit=explicit)
    return config


def _add_global_flags(p: argparse.ArgumentParser, root: bool) -> None:
    """Flags every command takes, before or after the subcommand (``kronos -q pipeline`` = ``kronos pipeline -q``).

    On subcommand parsers the default is SUPPRESS, so a flag given before the subcommand is not reset by it.
    """
    default = False if root else argparse.SUPPRESS
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")


def _new_command_parser(factory: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    p = factory(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}", formatter_class=_HelpFormatter
    )
    _add_global_flags(p, root=False)
    return p


def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the stage's last/ checkpoint")


def _quantile_list(text: str) -> list[float]:
    """``--quantiles 0.05,0.5,0.95``: comma-separated levels strictly inside (0, 1), sorted, no duplicates."""
    levels = []
    for part in (p.strip() for p in text.split(",")):
        try:
            q = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{part}' is not a number (give levels in (0, 1), e.g. 0.1,0.9)"
            ) from None
        if not 0.0 < q < 1.0:
            raise argparse.ArgumentTypeError(f"{part} is outside (0, 1) (give levels in (0, 1), e.g. 0.1,0.9)")
        levels.append(q)
    return sorted(set(levels))


def _add_forecast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help="CSV or Parquet with timestamps, open, high, low, close[, volume, amount] (required)",
    )
    p.add_argument(
        "--symbol",
        default="",
        help="the symbol to forecast when FILE holds several (a symbol/code column); default: the file's only symbol",
    )
    p.add_argument(
        "--tokenizer", required=True, metavar="PATH", help="tokenizer checkpoint folder or hub id (required)"
    )
    p.add_argument("--model", required=True, metavar="PATH", help="predictor checkpoint folder or hub id (required)")
    p.add_argument("--pred-len", type=int, required=True, metavar="N", help="number of future bars (required)")
    p.add_argument(
        "--lookback",
        type=int,
        default=0,
        metavar="N",
        help="use only the last N bars; 0 = all bars (the model sees at most --max-context)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=512,
        metavar="N",
        help="bars fed to the model (512 for Kronos-small/base, 2048 for Kronos-mini)",
    )
    p.add_argument("--T", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument(
        "--sample-count",
        type=int,
        default=1,
        metavar="S",
        help="sample paths averaged into the forecast; >= 2 adds quantile bands and p_up",
    )
    p.add_argument(
        "--quantiles",
        type=_quantile_list,
        default=None,
        metavar="Q1,Q2,...",
        help="close quantile levels in (0, 1) for the band columns close_qQ (needs --sample-count >= 2); "
        "default: 0.1,0.9, or the calibrated levels with --calibration",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for a reproducible forecast; default: unseeded")
    p.add_argument(
        "--calibration",
        default="",
        metavar="PATH",
        help="calibration.json of this model (kronos calibrate) for calibrated bands and P(up); default: raw bands",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps; default: CUDA, then MPS, then CPU")
    p.add_argument(
        "--output",
        default="",
        metavar="FILE",
        help="write the forecast (CSV, or Parquet for .parquet); parent folders are created; default: print it",
    )
    p.add_argument(
        "--plot",
        default="",
        metavar="PNG",
        help="also write a figure: history candles, the forecast from the last close, the band and "
        "P(up); default: no figure",
    )


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    add_pipeline_flags(p)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from kronos.serve.command import add_serve_args

    add_serve_args(p)


def _add_mcp_args(p: argparse.ArgumentParser) -> None:
    from kronos.serve.command import add_model_args

    add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The one argument parser: ``kronos [-q] COMMAND [flags]``."""
    from kronos import __version__

    parser = _Parser(
        prog="kronos",
        description="Train, finetune and use Kronos on your K-line data.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_flags(parser, root=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_args(_new_command_parser(sub.add_parser, name, command.help, command.example))
    return parser


def script_parser(command: str, prog: str, description: str = "") -> argparse.ArgumentParser:
    """A finetune/ script's parser: the flags of ``kronos COMMAND``, under the script's own name."""
    spec = COMMANDS[command]
    parser = _Parser(
        prog=prog,
        description=description or spec.help,
        epilog=f"same as: {spec.example}",
        formatter_class=_HelpFormatter,
    )
    _add_global_flags(parser, root=True)
    spec.add_args(parser)
    parser.set_defaults(command=command)
    return parser


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-data-process", action="store_true", help="reuse the processed dataset on disk")
    p.add_argument("--skip-tokenizer", action="store_true", help="reuse the finetuned tokenizer on disk")
    p.add_argument("--skip-predictor", action="store_true", help="reuse the finetuned predictor on disk")
    p.add_argument(
        "--skip-predict", action="store_true", help="stop after training (no prediction, evaluation, backtest)"
    )
    p.add_argument("--skip-backtest", action="store_true", help="predict and evaluate, but no backtest")
    p.add_argument("--resume", action="store_true", help="resume training stages from their last/ checkpoints")


def setup_logging(quiet: bool = False) -> None:
    """The one logging setup: INFO on rank 0 (WARNING with -q and on other ranks), noisy libraries at WARNING."""
    # Here, not at the top: kronos.train loads torch (~1.5 s), which `kronos --help` and the parser never need.
    from kronos.train.distributed import is_main_process

    level = logging.WARNING if quiet or not is_main_process() else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("qlib", "matplotlib", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_pipeline_command(args: argparse.Namespace, config: Config) -> int:
    """The whole pipeline; under torchrun the process group lives for all steps (barriers between them)."""
    from kronos.pipeline import KronosPipeline, steps_from_flags
    from kronos.train.distributed import process_group

    steps = steps_from_flags(
        skip_data=args.skip_data_process,
        skip_tokenizer=args.skip_tokenizer,
        skip_predictor=args.skip_predictor,
        skip_predict=args.skip_predict,
        skip_backtest=args.skip_backtest,
    )
    with process_group(config) as ctx:  # the steps' own process_group calls join this group
        pipe = KronosPipeline(config, resume=getattr(args, "resume", False))
        result = pipe.run(steps)
    if ctx.is_main:
        print_result_summary(result)
    return 0


def print_result_summary(result) -> None:
    lines = ["", "Kronos pipeline finished. Results:"]
    from kronos.evaluate.backtest.report import MIN_DAYS_TO_ANNUALISE

    if result.dataset_path:
        lines.append(f"  dataset:          {result.dataset_path}")
    lines.append(f"  tokenizer:        {result.tokenizer_path}")
    lines.append(f"  predictor:        {result.predictor_path}")
    if result.forecast_file:
        lines.append(f"  forecasts:        {result.forecast_file} (and .csv)")
    if result.metrics_file:
        lines.append(
            f"  metrics:          {result.metrics_file} (the report's headline for "
            f"{result.metrics.get('model', 'the model')})"
        )
    if getattr(result, "report_file", ""):
        lines.append(f"  report:           {result.report_file} (and report.md)")
        lines.extend("                    " + row for row in headline_rows(result.report_headline))
    if result.backtest_dir:
        lines.append(f"  backtest:         {result.backtest_dir}")
        for sig, s in result.backtest_summary.items():
            if s.get("annualised", True):
                returns = (
                    f"annualised excess return {_fmt(s.get('excess_return_without_cost/annualized_return'))} "
                    f"without cost, {_fmt(s.get('excess_return_with_cost/annualized_return'))} with cost"
                )
            else:  # too short a period to annualise: the period's own excess return
                returns = (
                    f"excess return over {s.get('n_days')} days ({s.get('start')} .. {s.get('end')}) "
                    f"{_fmt(s.get('excess_total_return_without_cost'))} without cost, "
                    f"{_fmt(s.get('excess_total_return_with_cost'))} with cost (not annualised: under "
                    f"{MIN_DAYS_TO_ANNUALISE} trading days)"
                )
            lines.append(
                f"                    signal {sig}: {returns}; "
                f"max drawdown {_fmt(s.get('excess_return_with_cost/max_drawdown'))}"
            )
    if result.plots:
        lines.append(f"  plots:            {len(result.plots)} PNG files, e.g. {result.plots[0]}")
    for note in getattr(result, "notes", []):
        lines.append(f"  note:             {note}")
    lines.append(f"  step seconds:     {result.seconds}")
    print("\n".join(lines), flush=True)


def headline_rows(headline: dict) -> list[str]:
    """One line per forecaster: the report's headline metrics."""
    from kronos.evaluate.report import HEADLINE_EXTRA

    keys = ("crps_rel", "crps_rel_calibrated", "mase", "direction_accuracy", "ic", "coverage_0.8", "brier_up")
    rows = []
    in_use = headline.get("model_in_use")
    for name, m in headline.items():
        if name in HEADLINE_EXTRA or not isinstance(m, dict):
            continue
        shown = [k for k in keys if k in m and m[k] is not None and m[k] == m[k]]  # undefined (NaN) left out
        label = (
            name
            + (" *" if name == in_use else "")
            + (" (in-sample)" if name == "zero_shot" and headline.get("zero_shot_in_sample") else "")
        )
        rows.append(f"{label:<12} " + ", ".join(f"{k}={_fmt(m[k])}" for k in shown))
    dm = headline.get("dm_finetuned_vs_zero_shot")
    if dm:
        rows.append(
            f"finetuned vs zero_shot: DM {_fmt(dm.get('dm_stat'))}, p {_fmt(dm.get('p_value'))} ({dm.get('loss')})"
        )
    if in_use:
        rows.append(f"* model in use: {in_use}")
    return rows


def print_headline(result) -> None:
    print(f"report: {result.report_file} (and report.md, PNGs); metrics: {result.metrics_file}")
    print("\n".join(headline_rows(result.report_headline)), flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and v is not None else str(v)


def _check_output_file(flag: str, target: str) -> None:
    """An output path must name a file whose existing parents are folders (missing ones are created later)."""
    from kronos.errors import InputError

    if not target:
        return
    path = Path(target).expanduser()
    if path.is_dir():
        example = path / ("forecast.png" if flag == "--plot" else "forecast.csv")
        raise InputError(f"{flag} '{target}' is a folder; give a file name in it, e.g. {example}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} '{target}': '{parent}' is a file, not a folder")
            break


def run_forecast_command(args: argparse.Namespace) -> int:
    from kronos.data.schema import VALUE_COLUMNS
    from kronos.data.sources.csv import read_kline_file
    from kronos.errors import InputError
    from kronos.inference import KronosPredictor, SamplingConfig
    from kronos.inference.bands import quantile_column

    # flags are checked before any file or model is read
    if args.lookback < 0:
        raise InputError(f"--lookback must be >= 0 (0 = all bars, up to --max-context), got {args.lookback}")
    for flag, value, least in (
        ("--pred-len", args.pred_len, 1),
        ("--sample-count", args.sample_count, 1),
        ("--max-context", args.max_context, 1),
    ):
        if value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}")
    if args.quantiles and args.sample_count < 2:
        raise InputError(
            f"--quantiles {','.join(f'{q:g}' for q in args.quantiles)} needs several sample paths; "
            f"add --sample-count 32 (got --sample-count {args.sample_count})"
        )
    for flag, target in (("--output", args.output), ("--plot", args.plot)):
        _check_output_file(flag, target)
    name = f"{args.symbol} in {Path(args.input).name}" if args.symbol else Path(args.input).name
    frame = read_kline_file(args.input, symbol=args.symbol).assign(symbol=name)
    lookback = min(args.lookback, len(frame)) if args.lookback > 0 else len(frame)  # default: the whole file
    predictor = KronosPredictor.from_pretrained(
        args.tokenizer, args.model, device=args.device, max_context=args.max_context
    )
    cal, qs = None, []
    if args.calibration:  # checked before sampling: a calibration for another model/lookback/horizon is refused
        from kronos.inference.bands import load_calibration

        cal = load_calibration(args.calibration)
        assert cal is not None  # a path was given
        cal.check(predictor, lookback=lookback, horizon=args.pred_len, source=f"calibration file '{args.calibration}'")
        qs = list(args.quantiles or cal.quantile_levels())
    elif args.sample_count > 1:
        qs = list(args.quantiles or [0.1, 0.9])
    sampling = SamplingConfig(
        T=args.T, top_k=args.top_k, top_p=args.top_p, sample_count=args.sample_count, seed=args.seed
    )
    records = predictor.predict_df(
        frame,
        pred_len=args.pred_len,
        lookback=lookback,
        quantiles=qs or [0.5],
        sampling=sampling,
        batch_size=1,
        calibration=cal,
    )
    out = records.set_index("timestamps")[[*VALUE_COLUMNS, *(quantile_column(q) for q in qs)]]
    if qs:  # P(up) per step (calibrated with a calibration)
        out = out.assign(p_up=records["p_up_calibrated" if cal is not None else "p_up"].to_numpy())
    last_close = float(records["last_close"].iloc[0])
    mean = out[list(VALUE_COLUMNS)]
    if args.output:
        from kronos import io as kio

        kio.write_file(args.output, out.to_parquet if args.output.endswith((".parquet", ".pq")) else out.to_csv)
        log.info("forecast written to %s", args.output)
    else:
        print(out.to_string())
    if args.plot:
        from kronos.evaluate.plots import plot_forecast

        history = frame.iloc[-lookback:].set_index("timestamps")[list(VALUE_COLUMNS)]
        band = None
        label = ""
        if len(qs) >= 2:
            lo, hi = min(qs), max(qs)
            band = (
                out[[quantile_column(lo)]].set_axis(["close"], axis=1),
                out[[quantile_column(hi)]].set_axis(["close"], axis=1),
            )
            label = f", {'calibrated ' if cal is not None else ''}band q{lo:g}-q{hi:g}"
        title = f"{name}: {args.pred_len}-bar forecast from last close {last_close:.4g}{label}"
        path = plot_forecast(
            history,
            mean,
            band,
            None,
            title,
            args.plot,
            prob_up=out["p_up"].to_numpy() if "p_up" in out.columns else None,
        )
        log.info("figure written to %s", path)
    return 0


_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EMFILE}


def main(
    argv: Sequence[str] | None = None,
    *,
    command: str | None = None,
    prog: str | None = None,
    description: str = "",
    **defaults: Any,
) -> int:
    """Run ``kronos ARGS`` (or, with ``command``, one command as a finetune/ script named ``prog``); the exit code.

    ``defaults`` pre-set flags of a script (e.g. ``cpu=True`` for the *_cpu.py scripts). Every user error is a
    :class:`KronosError`, printed as one line ``error: ...`` on stderr (exit 1); Ctrl-C exits 130.
    """
    if command is None:
        parser = build_parser()
    else:
        parser = script_parser(command, prog or f"kronos {command}", description)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.command is None:  # bare `kronos`
        parser.print_help()
        return 0
    try:
        setup_logging(args.quiet)  # inside: it loads torch, whose absence gets the one-line message below
        return run(args)
    except KronosError as exc:
        print_error(exc)
        return 1
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "kronos":
            raise  # a broken install of kronos itself: a bug, keep the traceback
        # e.g. `python finetune/...py` with a Python that is not the project's environment
        install = "pip install pyqlib" if missing == "qlib" else "pip install -e . from the checkout"
        print_error(
            f"Python package '{missing}' is not installed in {sys.executable}; run kronos in the "
            "environment you installed it into (`make setup`, then `source .venv/bin/activate`) or install "
            f"it here with `{install}`"
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kronos config | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # a read-only folder, a full disk, a quota: the environment, not a bug; writers left no partial file
        where = f" '{exc.filename}'" if exc.filename else ""
        print_error(
            f"cannot write{where}: {exc.strerror or exc}; free space or choose a writable folder "
            "(save_path, backtest_result_path, dataset_path, --output)"
        )
        return 1


def print_error(exc: BaseException | str) -> None:
    """The one error printer: ``error: <message>`` on one line of stderr, no traceback."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)


@dataclass(frozen=True)
class Command:
    """One ``kronos`` command: its help line, an example, its flags and its handler (exit code)."""

    help: str
    example: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


def run(args: argparse.Namespace) -> int:
    """Dispatch parsed arguments to their command's handler."""
    return COMMANDS[args.command].handler(args)


def _checked_config(args: argparse.Namespace) -> Config:
    """The command's config; a configured CUDA/MPS device that is missing fails now, not after the data step."""
    config = build_config(args)
    if args.command != "data" and str(config.device).strip().lower() not in ("auto", "cpu"):
        from kronos.train.distributed import resolve_device

        resolve_device(config.device, 0)
    return config


def _pipeline_for(args: argparse.Namespace, existing_run: bool = False):
    """A KronosPipeline over the command's config; ``existing_run``: on the latest run (or ``run_id``), not the
    shared output folders."""
    from kronos.pipeline import KronosPipeline
    from kronos.train.distributed import is_main_process

    config = _checked_config(args)
    if existing_run:
        from kronos.runs import for_existing_run

        config = for_existing_run(config)
    pipe = KronosPipeline(config, resume=getattr(args, "resume", False))
    if is_main_process():  # a folder a killed older version left at <name>.prev goes back first (logged)
        pipe.heal_outputs()
    # the run's saved test pass and forecast records, not new forecasts (re-forecast, logged, if settings differ)
    pipe.reuse_forecasts = args.command in ("evaluate", "backtest")
    return pipe


def _config_command(args: argparse.Namespace) -> int:
    print(json.dumps(build_config(args).effective_dict(), indent=2, ensure_ascii=False))
    return 0


def _pipeline_command(args: argparse.Namespace) -> int:
    return run_pipeline_command(args, _checked_config(args))


def _serve_command(args: argparse.Namespace) -> int:
    from kronos.serve.command import run_serve

    return run_serve(args)


def _mcp_command(args: argparse.Namespace) -> int:
    from kronos.serve.command import run_mcp

    return run_mcp(args)


def _data_command(args: argparse.Namespace) -> int:
    from kronos.train.distributed import launched_by_torchrun, process_group

    pipe = _pipeline_for(args)
    if launched_by_torchrun():  # every rank streams its share of the symbol chunks; rank 0 swaps the dataset in
        with process_group(pipe.config):
            manifest = pipe.process_data()
    else:
        manifest = pipe.process_data()
    rows = ", ".join(f"{name} {info['rows']} rows" for name, info in manifest["splits"].items())
    log.info("dataset ready at %s: %d symbols; %s", pipe.config.dataset_path, len(manifest["symbols"]), rows)
    return 0


def _train_tokenizer_command(args: argparse.Namespace) -> int:
    _pipeline_for(args).train_tokenizer()
    return 0


def _train_predictor_command(args: argparse.Namespace) -> int:
    _pipeline_for(args).train_predictor()
    return 0


def _predict_command(args: argparse.Namespace) -> int:
    pipe = _pipeline_for(args, existing_run=True)
    pipe.plot_forecasts(pipe.predict())
    print(f"forecasts: {pipe.result.forecast_file}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    pipe = _pipeline_for(args, existing_run=True)
    pipe.evaluate()
    print_headline(pipe.result)
    for note in pipe.result.notes:
        print(f"note: {note}")
    return 0


def _calibrate_command(args: argparse.Namespace) -> int:
    pipe = _pipeline_for(args, existing_run=True)
    for name, cal in pipe.calibrate().items():
        print(
            f"{name} calibration ({cal['method']}, {cal['n_anchors']} validation forecasts): "
            f"{pipe.calibration_file(name)}"
        )
        for lv, before in cal["coverage_before"].items():
            print(
                f"  {float(lv):.0%} band coverage on validation: {_fmt(before['coverage'])} -> "
                f"{_fmt(cal['coverage_after'][lv]['coverage'])}"
            )
    print(f"model in use: {pipe.result.model_in_use} ({pipe.result.model_selection.get('reason', '')})")
    return 0


def _backtest_command(args: argparse.Namespace) -> int:
    pipe = _pipeline_for(args, existing_run=True)
    summary = pipe.backtest()
    if not summary:
        print("\n".join(f"note: {note}" for note in pipe.result.notes))
        return 0
    print(f"backtest results: {pipe.result.backtest_dir}")
    print(json.dumps(summary, indent=2, default=str))
    return 0


# name -> Command; the `kronos` parser, every finetune/ script and the dispatch are built from this table
COMMANDS: dict[str, Command] = {
    "data": Command(
        "load, clean and split market data into the processed dataset",
        "kronos data --config-path examples/configs/demo.json",
        add_config_args,
        _data_command,
    ),
    "train-tokenizer": Command(
        "train or finetune the tokenizer (torchrun for several GPUs/processes)",
        "kronos train-tokenizer --config-path examples/configs/demo.json --cpu --fast-mode",
        _add_train_args,
        _train_tokenizer_command,
    ),
    "train-predictor": Command(
        "train or finetune the predictor (torchrun for several GPUs/processes)",
        "kronos train-predictor --config-path examples/configs/demo.json --cpu --fast-mode",
        _add_train_args,
        _train_predictor_command,
    ),
    "predict": Command(
        "forecast the bars after every symbol's latest lookback window",
        "kronos predict --config-path examples/configs/demo.json",
        add_config_args,
        _predict_command,
    ),
    "evaluate": Command(
        "walk-forward report on the test split: the model beside baselines (report.json/md, PNGs)",
        "kronos evaluate --config-path examples/configs/demo.json --fast-mode",
        add_config_args,
        _evaluate_command,
    ),
    "calibrate": Command(
        "fit calibrated bands and P(up) on validation anchors (calibration.json beside best_model)",
        "kronos calibrate --config-path examples/configs/demo.json --fast-mode",
        add_config_args,
        _calibrate_command,
    ),
    "backtest": Command(
        "top-k backtest of the forecast signals over backtest_time_range",
        "kronos backtest --config-path examples/configs/demo.json --fast-mode",
        add_config_args,
        _backtest_command,
    ),
    "pipeline": Command(
        "the complete pipeline: data, tokenizer, predictor, predict, evaluate, backtest",
        "kronos pipeline --config-path examples/configs/demo.json --cpu --fast-mode",
        _add_pipeline_args,
        _pipeline_command,
    ),
    "forecast": Command(
        "forecast one K-line file (CSV/Parquet) with any tokenizer/predictor checkpoints",
        "kronos forecast --input klines.csv --tokenizer ./Kronos-Tokenizer-base --model ./Kronos-small "
        "--pred-len 24 --output forecast.csv",
        _add_forecast_args,
        run_forecast_command,
    ),
    "serve": Command(
        "forecasting service: REST API (/docs), MCP (/mcp) and a web page (/)",
        "kronos serve --tokenizer ./tok --model ./pred --dataset ./data/processed",
        _add_serve_args,
        _serve_command,
    ),
    "mcp": Command(
        "MCP server over stdio (tools forecast, list_models, list_symbols)",
        "kronos mcp --run outputs",
        _add_mcp_args,
        _mcp_command,
    ),
    "config": Command(
        "print the effective config (defaults + file + flags) as JSON",
        "kronos config --config-path examples/configs/demo.json --fast-mode",
        add_config_args,
        _config_command,
    ),
}


if __name__ == "__main__":
    sys.exit(main())
