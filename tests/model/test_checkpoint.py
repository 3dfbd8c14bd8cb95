"""Checkpoint format, save/load, presets (keys, shapes, parameter counts of the published models) and errors."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from kronos.errors import CheckpointError, ConfigError
from kronos.inference import KronosPredictor
from kronos.model import (
    DEFAULT_MAX_CONTEXT,
    PREDICTOR_PRESETS,
    TOKENIZER_PRESETS,
    Kronos,
    KronosTokenizer,
    build_predictor,
    build_tokenizer,
    hub,
)
from kronos.model.kronos import FixedEmbedding

pytestmark = pytest.mark.usefixtures("one_thread")


# Spec 1.1 / 1.2: config.json fields = constructor arguments.
TOKENIZER_FIELDS = sorted(["d_in", "d_model", "n_heads", "ff_dim", "n_enc_layers", "n_dec_layers", "ffn_dropout_p",
                           "attn_dropout_p", "resid_dropout_p", "s1_bits", "s2_bits", "beta", "gamma0", "gamma",
                           "zeta", "group_size"])  # fmt: skip
PREDICTOR_FIELDS = sorted(["s1_bits", "s2_bits", "n_layers", "d_model", "n_heads", "ff_dim", "ffn_dropout_p",
                           "attn_dropout_p", "resid_dropout_p", "token_dropout_p", "learn_te"])  # fmt: skip


def _block(prefix: str, d: int, f: int, hd: int) -> list[tuple[str, tuple]]:
    keys = [(f"{prefix}.norm1.weight", (d,))]
    for proj in ("q", "k", "v", "out"):
        keys += [(f"{prefix}.self_attn.{proj}_proj.weight", (d, d)), (f"{prefix}.self_attn.{proj}_proj.bias", (d,))]
    keys += [(f"{prefix}.self_attn.rotary.inv_freq", (hd // 2,)), (f"{prefix}.norm2.weight", (d,)),
             (f"{prefix}.ffn.w1.weight", (f, d)), (f"{prefix}.ffn.w3.weight", (f, d)),
             (f"{prefix}.ffn.w2.weight", (d, f))]  # fmt: skip
    return keys


def expected_tokenizer_keys(c: dict) -> list[tuple[str, tuple]]:
    """Spec 1.4 tokenizer table."""
    d, k = c["d_model"], c["s1_bits"] + c["s2_bits"]
    hd = d // c["n_heads"]
    keys = [("embed.weight", (d, c["d_in"])), ("embed.bias", (d,)), ("head.weight", (c["d_in"], d)),
            ("head.bias", (c["d_in"],))]  # fmt: skip
    for i in range(c["n_enc_layers"] - 1):
        keys += _block(f"encoder.{i}", d, c["ff_dim"], hd)
    for j in range(c["n_dec_layers"] - 1):
        keys += _block(f"decoder.{j}", d, c["ff_dim"], hd)
    keys += [("quant_embed.weight", (k, d)), ("quant_embed.bias", (k,)),
             ("post_quant_embed_pre.weight", (d, c["s1_bits"])), ("post_quant_embed_pre.bias", (d,)),
             ("post_quant_embed.weight", (d, k)), ("post_quant_embed.bias", (d,)),
             ("tokenizer.bsq.basis", (k,)), ("tokenizer.bsq.group_basis", (c["group_size"],))]  # fmt: skip
    return keys


def expected_predictor_keys(c: dict) -> list[tuple[str, tuple]]:
    """Spec 1.4 predictor table."""
    d, v1, v2 = c["d_model"], 2 ** c["s1_bits"], 2 ** c["s2_bits"]
    te = "" if c["learn_te"] else ".emb"
    keys = [("embedding.emb_s1.weight", (v1, d)), ("embedding.emb_s2.weight", (v2, d)),
            ("embedding.fusion_proj.weight", (d, 2 * d)), ("embedding.fusion_proj.bias", (d,))]  # fmt: skip
    for name, size in (("minute", 60), ("hour", 24), ("weekday", 7), ("day", 32), ("month", 13)):
        keys.append((f"time_emb.{name}_embed{te}.weight", (size, d)))
    for i in range(c["n_layers"]):
        keys += _block(f"transformer.{i}", d, c["ff_dim"], d // c["n_heads"])
    keys.append(("norm.weight", (d,)))
    for proj in ("q", "k", "v", "out"):
        keys += [(f"dep_layer.cross_attn.{proj}_proj.weight", (d, d)), (f"dep_layer.cross_attn.{proj}_proj.bias", (d,))]
    keys += [("dep_layer.cross_attn.rotary.inv_freq", (d // 8,)), ("dep_layer.norm.weight", (d,)),
             ("head.proj_s1.weight", (v1, d)), ("head.proj_s1.bias", (v1,)),
             ("head.proj_s2.weight", (v2, d)), ("head.proj_s2.bias", (v2,))]  # fmt: skip
    return keys


@pytest.fixture
def no_init(monkeypatch):
    """Skip random initialisation: only the layout is checked, and building on the meta device would import
    torch._dynamo (seconds) for its decompositions. Uninitialised CPU storage is allocated lazily, so this is fast."""
    for name in ("normal_", "xavier_normal_", "kaiming_uniform_", "uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, **k: t)


def _layout(module: torch.nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize(
    "preset,entries,params", [("base", 96, 3_958_042), ("2k", 96, 3_958_042), ("tiny", None, None)]
)
def test_tokenizer_preset_layout(preset, entries, params, no_init):
    tok = build_tokenizer(preset)
    assert _layout(tok) == expected_tokenizer_keys(TOKENIZER_PRESETS[preset])
    if entries is not None:
        assert len(tok.state_dict()) == entries
        assert sum(p.numel() for p in tok.parameters()) == params
    assert sorted(tok.config) == TOKENIZER_FIELDS
    assert "tokenizer.bsq.group_codebook" not in tok.state_dict()  # non-persistent buffer
    assert tok.tokenizer.bsq.group_codebook.shape == (2 ** TOKENIZER_PRESETS[preset]["group_size"],
                                                      TOKENIZER_PRESETS[preset]["group_size"])  # fmt: skip


@pytest.mark.parametrize(
    "preset,entries,params",
    [("mini", 80, 4_108_032), ("small", 136, 24_741_376), ("base", 192, 102_310_592), ("tiny", None, None)],
)
def test_predictor_preset_layout(preset, entries, params, no_init):
    model = build_predictor(preset)
    assert _layout(model) == expected_predictor_keys(PREDICTOR_PRESETS[preset])
    if entries is not None:
        assert len(model.state_dict()) == entries
        assert sum(p.numel() for p in model.parameters()) == params
    assert sorted(model.config) == PREDICTOR_FIELDS
    assert dict(model.named_buffers()).keys() <= dict(model.state_dict()).keys()  # no non-persistent buffers


def test_fixed_time_tables_key_names_and_frozen():
    model = build_predictor("tiny", learn_te=False)
    assert _layout(model) == expected_predictor_keys({**PREDICTOR_PRESETS["tiny"], "learn_te": False})
    table = model.time_emb.hour_embed.emb.weight
    assert not table.requires_grad
    d = table.shape[1]
    pos = torch.arange(24.0)[:, None]
    freq = 10000 ** (-torch.arange(0, d, 2).float() / d)
    sinusoid = torch.zeros(24, d)
    sinusoid[:, 0::2], sinusoid[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    fresh = FixedEmbedding(24, d).emb.weight  # the table as designed ...
    assert torch.allclose(fresh, sinusoid, atol=1e-6)
    # ... but Q6: the predictor's init overwrites it with N(0, D^-1/2) noise.
    assert not torch.allclose(table, sinusoid, atol=0.1)
    assert abs(float(table.std()) - d**-0.5) < 0.05


def test_presets_are_consistent():
    assert set(TOKENIZER_PRESETS) == {"base", "2k", "tiny"}
    assert set(PREDICTOR_PRESETS) == {"mini", "small", "base", "tiny"}
    assert {k: DEFAULT_MAX_CONTEXT[k] for k in ("mini", "small", "base")} == {"mini": 2048, "small": 512, "base": 512}
    assert TOKENIZER_PRESETS["tiny"]["s1_bits"] == PREDICTOR_PRESETS["tiny"]["s1_bits"]
    assert TOKENIZER_PRESETS["2k"] == {**TOKENIZER_PRESETS["base"], "group_size": 5}


def test_build_errors_and_overrides():
    with pytest.raises(ConfigError, match=r"unknown tokenizer preset 'huge'.*'2k', 'base', 'tiny'"):
        build_tokenizer("huge")
    with pytest.raises(ConfigError, match=r"unknown predictor preset 'large'.*'base', 'mini', 'small', 'tiny'"):
        build_predictor("large")
    with pytest.raises(ConfigError, match="unknown keys \\['n_layer'\\]"):
        build_predictor({**PREDICTOR_PRESETS["tiny"], "n_layer": 3})
    with pytest.raises(ConfigError, match="missing keys \\['learn_te'\\]"):
        build_predictor({k: v for k, v in PREDICTOR_PRESETS["tiny"].items() if k != "learn_te"})
    model = build_predictor({"preset": "tiny", "n_layers": 3})
    assert model.config["n_layers"] == 3 and len(model.transformer) == 3
    assert build_tokenizer("tiny", d_model=16).config["d_model"] == 16


# ---------------------------------------------------------------------- save / load
def _forecast(model: Kronos, tokenizer: KronosTokenizer) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    close = 10 + np.cumsum(rng.normal(0, 0.1, 40))
    df = pd.DataFrame({"open": close, "high": close + 0.1, "low": close - 0.1, "close": close,
                       "volume": rng.uniform(100, 200, 40)})  # fmt: skip
    ts = pd.Series(pd.date_range("2024-01-01", periods=46, freq="h"))
    predictor = KronosPredictor(model, tokenizer, device="cpu", max_context=32)
    return predictor.predict(df, ts[:40], ts[40:], 6, top_k=1, verbose=False)


@pytest.mark.parametrize("learn_te", [True, False])
def test_save_load_round_trip(tmp_path, learn_te):
    torch.manual_seed(1)
    tokenizer = build_tokenizer("tiny")
    model = build_predictor("tiny", learn_te=learn_te)
    tokenizer.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "pred")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "tok"]  # no temp folders left behind
    for folder, module, fields in ((tmp_path / "tok", tokenizer, TOKENIZER_FIELDS),
                                   (tmp_path / "pred", model, PREDICTOR_FIELDS)):  # fmt: skip
        text = (folder / "config.json").read_text(encoding="utf-8")
        config = json.loads(text)
        assert list(config) == fields  # exactly the constructor kwargs, sorted
        assert text == json.dumps(module.config, indent=2, sort_keys=True)
        assert sorted(load_file(str(folder / "model.safetensors"))) == sorted(module.state_dict())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok2 = KronosTokenizer.from_pretrained(tmp_path / "tok")
        model2 = Kronos.from_pretrained(str(tmp_path / "pred"))
    assert not tok2.training and not model2.training
    for a, b in ((tokenizer, tok2), (model, model2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    if not learn_te:
        assert not model2.time_emb.minute_embed.emb.weight.requires_grad
    pd.testing.assert_frame_equal(_forecast(model, tokenizer), _forecast(model2, tok2))


def test_official_hub_mixin_reads_our_checkpoints(tmp_path):
    """The official classes load with huggingface_hub's PyTorchModelHubMixin; it must accept what we save."""
    from huggingface_hub import PyTorchModelHubMixin

    class HubKronos(PyTorchModelHubMixin, Kronos):
        pass

    model = build_predictor("tiny")
    model.save_pretrained(tmp_path / "pred")
    loaded = HubKronos.from_pretrained(tmp_path / "pred")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    loaded.save_pretrained(tmp_path / "by_mixin")  # and we read what the mixin writes
    again = Kronos.from_pretrained(tmp_path / "by_mixin")
    assert again.config == model.config


def test_save_into_existing_folder_replaces_weights_keeps_other_files(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    first = build_predictor("tiny")
    first.save_pretrained(target)
    torch.manual_seed(5)
    second = build_predictor("tiny")
    second.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = Kronos.from_pretrained(target)
    assert torch.equal(loaded.head.proj_s1.weight, second.head.proj_s1.weight)


def test_loading_casts_to_float32_and_moves_device(tmp_path):
    model = build_predictor("tiny")
    model.save_pretrained(tmp_path / "p")
    state = load_file(str(tmp_path / "p" / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()},
              str(tmp_path / "p" / "model.safetensors"))  # fmt: skip
    loaded = Kronos.from_pretrained(tmp_path / "p", map_location="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


# ---------------------------------------------------------------------- errors
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        Kronos.from_pretrained(tmp_path / "nope")
    # the README's quick start before its download step: the error says how to download that checkpoint
    with pytest.raises(CheckpointError, match=r"hf download NeoQuasar/Kronos-small --local-dir \./Kronos-small"):
        Kronos.from_pretrained(tmp_path / "Kronos-small")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        Kronos.from_pretrained(tmp_path / "empty")
    build_predictor("tiny").save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        Kronos.from_pretrained(tmp_path / "p")


def test_wrong_config_keys(tmp_path):
    build_tokenizer("tiny").save_pretrained(tmp_path / "tok")
    with pytest.raises(CheckpointError, match=r"config.json: unknown key\(s\) \['beta'"):
        Kronos.from_pretrained(tmp_path / "tok")  # a tokenizer folder given as predictor
    folder = tmp_path / "pred"
    build_predictor("tiny").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["learn_te"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['learn_te'\]"):
        Kronos.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        Kronos.from_pretrained(folder)


def test_weights_that_do_not_fit_the_config(tmp_path):
    folder = tmp_path / "pred"
    build_predictor("tiny").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        Kronos.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(str(folder / "model.safetensors"))
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['norm.weight'\]"):
        Kronos.from_pretrained(folder)
    loaded = Kronos.from_pretrained(folder, strict=False)  # non-strict like the official mixin
    assert torch.equal(loaded.norm.weight, torch.ones(32))
    # extra tensors alone (e.g. from a newer exporter) are ignored with a warning, as the official loader does
    state = load_file(str(folder / "model.safetensors"))
    state["norm.weight"] = torch.full((32,), 2.0)
    save_file(state, str(folder / "model.safetensors"))
    assert torch.equal(Kronos.from_pretrained(folder).norm.weight, torch.full((32,), 2.0))


def test_recomputable_buffers_may_be_absent(tmp_path):
    folder = tmp_path / "tok"
    tok = build_tokenizer("tiny")
    tok.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith(("inv_freq", "basis"))}
    save_file(state, str(folder / "model.safetensors"))
    loaded = KronosTokenizer.from_pretrained(folder)
    assert torch.equal(loaded.encoder[0].self_attn.rotary.inv_freq, tok.encoder[0].self_attn.rotary.inv_freq)


def test_unreachable_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        Kronos.from_pretrained("NeoQuasar/Kronos-small", cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert "hf download NeoQuasar/Kronos-small --local-dir ./Kronos-small" in message


def test_hub_id_without_network_mock_fails_fast_with_checkpoint_error(tmp_path):
    # Real resolution (offline machines: the probe fails at once; online ones: the repo does not exist).
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="download the checkpoint to a folder"):
        KronosTokenizer.from_pretrained("kronos-tests-nonexistent/no-such-model", cache_dir=tmp_path)
    assert time.monotonic() - start < 15


def test_config_with_fewer_layers_than_the_weights_is_an_error(tmp_path):
    folder = tmp_path / "pred"
    build_predictor("tiny").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["n_layers"] >= 2
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": config["n_layers"] - 1}))
    with pytest.raises(CheckpointError, match=r"layers config.json does not have .*check n_layers") as info:
        Kronos.from_pretrained(folder)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="layers config.json does not have"):
        Kronos.from_pretrained(folder, strict=False)  # never silently a different model


def test_absurd_config_fails_before_allocating(tmp_path):
    folder = tmp_path / "pred"
    build_predictor("tiny").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_model": 1 << 16, "ff_dim": 1 << 18}))
    start = time.monotonic()  # the model described would need hundreds of GB: checked on the meta device first
    with pytest.raises(CheckpointError, match="shape mismatch"):
        Kronos.from_pretrained(folder)
    assert time.monotonic() - start < 5


@pytest.mark.slow
def test_hub_endpoint_that_never_answers_fails_within_seconds(tmp_path, monkeypatch):
    import socket as _socket

    from huggingface_hub import constants

    with _socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        start = time.monotonic()
        with pytest.raises(CheckpointError, match="cannot be reached") as info:
            Kronos.from_pretrained("NeoQuasar/Kronos-small", cache_dir=tmp_path)
        assert time.monotonic() - start < 8
        assert "\n" not in str(info.value)
