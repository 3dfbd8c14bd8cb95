"""Config: seed defaults, file overrides, errors that name the key, derived paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kronos.config import Config
from kronos.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_seed_defaults():
    c = Config()
    assert c.lookback_window == 90 and c.predict_window == 10 and c.max_context == 512
    assert c.feature_list == ["open", "high", "low", "close", "vol", "amt"]
    assert c.time_feature_list == ["minute", "hour", "weekday", "day", "month"]
    assert c.batch_size == 50 and c.n_train_iter == 100_000 and c.n_val_iter == 20_000
    assert c.tokenizer_learning_rate == 2e-4 and c.predictor_learning_rate == 4e-5
    assert (c.inference_T, c.inference_top_p, c.inference_top_k, c.inference_sample_count) == (0.6, 0.9, 0, 32)
    assert c.benchmark == "SH000300"
    assert c.finetuned_tokenizer.endswith("finetune_tokenizer_demo/checkpoints/best_model")


def test_json_overrides_subset_and_derived_paths_follow(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"save_path": "runs/m", "epochs": 3, "instrument": "csi500", "clip": 4}))
    c = Config.from_file(f)
    assert c.epochs == 3 and c.clip == 4.0 and isinstance(c.clip, float)
    # relative paths in a file are relative to the file's folder
    assert Path(c.save_path) == tmp_path / "runs" / "m"
    assert Path(c.finetuned_predictor) == tmp_path / "runs/m/finetune_predictor_demo/checkpoints/best_model"
    assert c.benchmark == "SH000905"
    assert c.batch_size == 50  # untouched keys keep their defaults


def test_explicit_finetuned_path_wins(tmp_path):
    c = Config.from_dict({"finetuned_tokenizer_path": "/x/tok", "save_path": "/y"})
    assert c.finetuned_tokenizer == "/x/tok"
    assert c.finetuned_predictor.startswith("/y/")


def test_yaml_overrides(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("epochs: 2\nquantiles: [0.05, 0.95]\n")
    c = Config.from_file(f)
    assert c.epochs == 2 and c.quantiles == [0.05, 0.95]


def test_hub_ids_are_not_turned_into_paths(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"pretrained_predictor_path": "NeoQuasar/Kronos-small"}))
    assert Config.from_file(f).pretrained_predictor_path == "NeoQuasar/Kronos-small"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"lookback_windw": 5}, ["lookback_windw", "did you mean 'lookback_window'"]),
        ({"epochs": "ten"}, ["'epochs'", "integer"]),
        ({"use_comet": 1}, ["'use_comet'", "true or false"]),
        ({"train_time_range": ["2020-01-01"]}, ["train_time_range"]),
        ({"precision": "fp8"}, ["precision", "bf16"]),
        ({"batch_size": 0}, ["batch_size", ">= 1"]),
    ],
)
def test_bad_overrides_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 3,,}')
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        Config.from_file(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object of config keys"):
        Config.from_file(arr)


def test_save_writes_effective_config(tmp_path):
    c = Config.from_dict({"save_path": str(tmp_path / "m")})
    c.save(tmp_path / "out" / "pipeline_config.json")
    data = json.loads((tmp_path / "out" / "pipeline_config.json").read_text())
    assert data["finetuned_tokenizer_path"] == c.finetuned_tokenizer
    assert set(Config.keys()) <= set(data)
    assert Config.from_dict(data).finetuned_tokenizer == c.finetuned_tokenizer


@pytest.mark.slow
def test_cli_reports_config_errors_in_one_line(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"batch_sise": 3}))
    r = subprocess.run(
        [sys.executable, "-m", "kronos.cli", "config", "--config-path", str(f)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "batch_sise" in r.stderr and "batch_size" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "kronos.cli", "config", "--fast-mode", "--set", "epochs=7"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    from kronos.config import FAST_MODE_CAPS

    assert data["epochs"] == 7  # a key the user set wins over fast mode
    assert data["n_train_iter"] == FAST_MODE_CAPS["n_train_iter"] and data["eval_max_anchors"] > 0


def test_fast_mode_picks_cpu_presets_from_scratch_and_keeps_what_the_user_set(caplog):
    from kronos.config import FAST_MODE_CAPS, apply_fast_mode

    cfg = Config(
        pretrained_tokenizer_path="",
        pretrained_predictor_path="",
        n_train_iter=10**6,
        predictor_preset="mini",
        epochs=30,
    )
    with caplog.at_level("INFO", logger="kronos.config"):
        apply_fast_mode(cfg, explicit={"predictor_preset", "pretrained_tokenizer_path", "pretrained_predictor_path"})
    assert cfg.tokenizer_preset == "tiny" and cfg.tokenizer_learning_rate == 2e-3  # from scratch: CPU-sized
    assert cfg.predictor_preset == "mini"  # the user's own preset wins
    assert cfg.n_train_iter == FAST_MODE_CAPS["n_train_iter"] and cfg.epochs == FAST_MODE_CAPS["epochs"]
    assert "tokenizer_preset 'base' -> 'tiny'" in caplog.text and "epochs 30 -> 2" in caplog.text
    assert "kept your own predictor_preset='mini'" in caplog.text
    # finetuning a pretrained model: presets are not used, so fast mode leaves them and the learning rates alone
    pre = apply_fast_mode(Config(), explicit=set())
    assert pre.predictor_preset == Config().predictor_preset and pre.predictor_learning_rate == 4e-5
    # without the list of keys (Python callers), presets and learning rates other than the defaults are kept
    own = apply_fast_mode(Config(pretrained_predictor_path="", pretrained_tokenizer_path="", predictor_preset="mini"))
    assert own.predictor_preset == "mini" and own.tokenizer_preset == "tiny"


# ------------------------------------------------------------------ hostile and mistaken values
@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"split_ratios": [0.6, "a", 0.2]}, "split_ratios"),
        ({"tokenizer_learning_rate": float("nan")}, "tokenizer_learning_rate"),
        ({"predictor_learning_rate": -1e-4}, "predictor_learning_rate"),
        ({"predictor_learning_rate": 5.0}, "predictor_learning_rate"),
        ({"quantiles": [0.1, 1.2]}, "quantiles"),
        ({"quantiles": [0.0, 0.5]}, "quantiles"),
        ({"quantiles": []}, "quantiles"),
        ({"inference_top_k": -1}, "inference_top_k"),
        ({"inference_top_p": 2.0}, "inference_top_p"),
        ({"inference_T": float("inf")}, "inference_T"),
        ({"lookback_window": -5}, "lookback_window"),
        ({"tokenizer_save_folder_name": "../../escaped"}, "tokenizer_save_folder_name"),
        ({"backtest_save_folder_name": "/tmp/x"}, "backtest_save_folder_name"),
        ({"predictor_save_folder_name": ""}, "predictor_save_folder_name"),
    ],
)
def test_bad_values_are_one_line_config_errors(overrides, words):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(overrides)
    assert f"'{words}'" in str(info.value) and "\n" not in str(info.value)


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    import time

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"uses the YAML alias \*a at line 2; aliases are not allowed"):
        Config.from_file(path)
    assert time.monotonic() - start < 2
    big = tmp_path / "big.json"
    big.write_text('{"epochs": 1' + " " * (2 << 20) + "}")
    with pytest.raises(ConfigError, match="at most 1,048,576 bytes"):
        Config.from_file(big)


def test_a_key_given_twice_is_one_line_naming_it_and_both_lines(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{\n  "batch_size": 16,\n  "epochs": 2,\n  "batch_size": 64\n}\n')
    with pytest.raises(ConfigError) as err:
        Config.from_file(path)
    assert "'batch_size' twice (lines 2 and 4)" in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "dup.yaml"
    path.write_text("batch_size: 16\nepochs: 2\nbatch_size: 64\n")
    with pytest.raises(ConfigError, match=r"'batch_size' twice \(lines 1 and 3\)"):
        Config.from_file(path)
    # the same key in two different objects is not a duplicate
    path = tmp_path / "ok.json"
    path.write_text('{"epochs": 2, "train_time_range": ["2018-01-01", "2022-12-31"]}')
    assert Config.from_file(path).epochs == 2


def test_yaml_dates_are_read_as_dates(tmp_path):
    path = tmp_path / "dates.yaml"
    path.write_text("dataset_begin_time: 2021-01-01\ntrain_time_range: [2021-01-01, 2023-06-30 15:00:00]\n")
    cfg = Config.from_file(path)
    assert cfg.dataset_begin_time == "2021-01-01"
    assert cfg.train_time_range == ["2021-01-01", "2023-06-30 15:00:00"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"inference_top_p": 1.5}, ["inference_top_p", "(0, 1]", "1.5"]),
        ({"device": "gpu"}, ["device", "cuda:N"]),
        ({"sina_scale": 7}, ["sina_scale", "240"]),
        ({"sina_timeout": 0}, ["sina_timeout", "> 0"]),
        ({"sina_symbols": []}, ["sina_symbols", "at least one"]),
        ({"sina_base_url": "ftp://x"}, ["sina_base_url", "http"]),
        ({"quantiles": [0.1, 1.0]}, ["quantiles", "between 0 and 1"]),
        ({"test_time_range": ["2024-05-01", "2024-01-01"]}, ["test_time_range", "start <= end"]),
        ({"split_ratios": [0.5, 0.5, 0.5]}, ["split_ratios", "summing to 1"]),
        ({"batch_size": 10, "accumulation_steps": 3}, ["batch_size", "accumulation_steps", "divisible"]),
    ],
)
def test_the_validation_table_names_key_rule_and_value(overrides, words):
    with pytest.raises(ConfigError) as e:
        Config.from_dict(overrides)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_every_rule_names_a_real_key():
    from kronos.config import RULES

    assert set(RULES) <= set(Config.keys())


def test_fast_mode_caps_never_raise_and_zero_means_unlimited():
    from kronos.config import FAST_MODE_CAPS, apply_fast_mode

    c = apply_fast_mode(Config.from_dict({"epochs": 2, "eval_max_anchors": 0, "batch_size": 64}))
    assert c.epochs == 2  # a smaller value is kept
    assert c.batch_size == FAST_MODE_CAPS["batch_size"] and c.eval_max_anchors == FAST_MODE_CAPS["eval_max_anchors"]


def test_to_dict_redacts_every_secret_by_default(tmp_path):
    c = Config.from_dict(
        {
            "comet_config": {
                "api_key": "k-123",
                "project_name": "p",
                "workspace": "w",
                "nested": {"hf_token": "t-9", "db_password": "pw"},
            }
        }
    )
    data = c.to_dict()
    assert data["comet_config"]["api_key"] == "***" and data["comet_config"]["project_name"] == "p"
    assert data["comet_config"]["nested"] == {"hf_token": "***", "db_password": "***"}
    assert data["tokenizer_learning_rate"] == c.tokenizer_learning_rate  # "tokenizer" is not a token
    assert c.to_dict(redact=False)["comet_config"]["api_key"] == "k-123"
    assert c.comet_config["api_key"] == "k-123"  # the object itself keeps it for the Comet client
    c.save(tmp_path / "cfg.json")
    text = (tmp_path / "cfg.json").read_text()
    assert "k-123" not in text and "t-9" not in text and 'pw"' not in text
    assert Config.from_dict({"comet_config": {"api_key": ""}}).to_dict()["comet_config"]["api_key"] == ""


def test_views_group_the_flat_keys_and_cannot_change_the_config():
    import dataclasses

    cfg = Config.from_dict({"eval_seeds": [1, 2], "eval_max_anchors": 7, "backtest_n_symbol_hold": 3,
                            "instrument": "csi500", "lookback_window": 30})  # fmt: skip
    assert cfg.eval.seeds == (1, 2) and cfg.eval.max_anchors == 7 and cfg.eval.lookback == 30
    assert Config().eval.seeds == (Config().inference_seed,)  # no eval_seeds: the inference seed
    assert cfg.backtest.n_symbol_hold == 3 and cfg.backtest.benchmark == cfg.benchmark
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eval.stride = 5  # type: ignore[misc]
    # the file format stays flat: views are not keys
    assert "eval" not in cfg.to_dict() and "eval_seeds" in cfg.to_dict()


def test_the_config_object_reads_like_the_official_one():
    """Official code reads config.finetuned_tokenizer_path as a path; the file format keeps "" (derived)."""
    cfg = Config.from_dict({"save_path": "/runs/x", "instrument": "csi500"})
    assert cfg.finetuned_tokenizer_path == "/runs/x/finetune_tokenizer_demo/checkpoints/best_model"
    assert cfg.finetuned_predictor_path.endswith("finetune_predictor_demo/checkpoints/best_model")
    assert cfg.backtest_benchmark == "SH000905"
    assert cfg.to_dict()["finetuned_tokenizer_path"] == "" and cfg.explicit("backtest_benchmark") == ""
    cfg.update({"save_path": "/runs/y"})  # a derived path still follows save_path
    assert cfg.finetuned_tokenizer_path.startswith("/runs/y/")
    assert Config.from_dict({"finetuned_tokenizer_path": "/mine"}).finetuned_tokenizer_path == "/mine"
