"""Finetune modes (full / freeze / lora), the kept tokenizer, and LoRA checkpoints that stay official-format."""

from __future__ import annotations

import pytest
import torch

from _support.models import save_tiny_pair
from _support.training import tiny_config
from kronos.config import Config
from kronos.errors import ConfigError
from kronos.model import Kronos, KronosTokenizer, build_predictor
from kronos.train import finetune, train_predictor, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, dataset):
    """The dataset and a 'pretrained' tiny pair (seeded fresh weights saved in the official format)."""
    root = tmp_path_factory.mktemp("ft")
    save_tiny_pair(root / "pre" / "tokenizer", root / "pre" / "predictor", seed=1, n_layers=3)
    return root, dataset


def _config(tmp_path, pretrained, **kw):
    root, dataset = pretrained
    base = dict(
        pretrained_tokenizer_path=str(root / "pre" / "tokenizer"),
        pretrained_predictor_path=str(root / "pre" / "predictor"),
        finetune_tokenizer=False,
        epochs=1,
        n_train_iter=16 * 3,
    )
    return tiny_config(tmp_path, dataset, **{**base, **kw})


def _inputs(seed=0, n=4, t=12):
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randint(0, 16, (n, t), generator=g)
    s2 = torch.randint(0, 16, (n, t), generator=g)
    stamp = torch.zeros(n, t, 5, dtype=torch.long)
    return s1, s2, stamp


def test_lora_merge_gives_the_adapter_models_outputs():
    cfg = Config.from_dict(
        dict(
            finetune_mode="lora",
            lora_rank=4,
            lora_alpha=8.0,
            lora_dropout=0.0,
            lora_target_modules=["q_proj", "v_proj", "w2", "proj_s1"],
        )
    )
    torch.manual_seed(0)
    model = finetune.apply_finetune_mode(build_predictor("tiny"), cfg, "predictor")
    with torch.no_grad():  # adapters start at zero (B = 0): give them values so the merge has something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    s1, s2, stamp = _inputs()
    with torch.no_grad():
        want = model(s1, s2, stamp, use_teacher_forcing=True, s1_targets=s1)
        plain = finetune.merged_copy(model).eval()
        got = plain(s1, s2, stamp, use_teacher_forcing=True, s1_targets=s1)
    assert not any("lora_" in n for n in plain.state_dict())
    assert set(plain.state_dict()) == set(build_predictor("tiny").state_dict())
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    base = build_predictor("tiny").eval()  # the same fresh weights without adapters: other outputs
    with torch.no_grad():
        assert not torch.allclose(base(s1, s2, stamp, use_teacher_forcing=True, s1_targets=s1)[0], want[0])
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_freeze_keeps_embeddings_and_lower_blocks(tmp_path, pretrained):
    cfg = _config(tmp_path, pretrained, finetune_mode="freeze", freeze_layers=2)
    before = Kronos.from_pretrained(cfg.pretrained_predictor_path).state_dict()
    train_tokenizer(cfg)
    summary = train_predictor(cfg)
    after = Kronos.from_pretrained(cfg.finetuned_predictor).state_dict()
    frozen = [k for k in before if k.startswith(("embedding.", "time_emb.", "transformer.0.", "transformer.1."))]
    moved = [k for k in before if k.startswith(("transformer.2.", "head.")) and k.endswith("weight")]
    assert frozen and moved
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in moved)
    assert summary["global_step"] == 3


def test_lora_run_saves_plain_checkpoints_and_resumes_exactly(tmp_path, pretrained, monkeypatch):
    from safetensors.torch import load_file

    from kronos.train.trainer import Trainer

    cfg = _config(tmp_path / "a", pretrained, finetune_mode="lora", lora_rank=2, epochs=2)
    tok = train_tokenizer(cfg)
    assert tok["trained"] is False  # finetune_tokenizer false: the pretrained tokenizer, copied unchanged
    kept = KronosTokenizer.from_pretrained(cfg.finetuned_tokenizer).state_dict()
    for k, v in KronosTokenizer.from_pretrained(cfg.pretrained_tokenizer_path).state_dict().items():
        assert torch.equal(kept[k], v)
    whole = train_predictor(cfg)
    best = Kronos.from_pretrained(cfg.finetuned_predictor)  # an official-format folder: plain Kronos weights
    base = Kronos.from_pretrained(cfg.pretrained_predictor_path).state_dict()
    assert set(best.state_dict()) == set(base)
    assert any(not torch.equal(best.state_dict()[k], base[k]) for k in base)
    last_a = load_file(
        str(tmp_path / "a" / "out" / cfg.predictor_save_folder_name / "checkpoints" / "last" / "model.safetensors")
    )

    # the same run killed after its first epoch, then resumed: the same weights at the end
    cfg_b = _config(tmp_path / "b", pretrained, finetune_mode="lora", lora_rank=2, epochs=2)
    train_tokenizer(cfg_b)
    real = Trainer._run_epoch
    calls = []

    def stop_after_one(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_run_epoch", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        train_predictor(cfg_b)
    monkeypatch.setattr(Trainer, "_run_epoch", real)
    last_b_dir = tmp_path / "b" / "out" / cfg.predictor_save_folder_name / "checkpoints" / "last"
    assert (last_b_dir / finetune.ADAPTER_FILE).is_file()
    resumed = train_predictor(cfg_b, resume=True)
    assert resumed["global_step"] == whole["global_step"]
    last_b = load_file(str(last_b_dir / "model.safetensors"))
    for k in last_a:
        torch.testing.assert_close(last_a[k], last_b[k], rtol=0, atol=1e-6)


def test_modes_need_a_pretrained_predictor_and_real_layer_names(tmp_path, pretrained):
    cfg = _config(tmp_path, pretrained, finetune_mode="lora", lora_target_modules=["nope"])
    train_tokenizer(cfg)
    with pytest.raises(ConfigError, match="lora_target_modules"):
        train_predictor(cfg)
    cfg = _config(tmp_path, pretrained, finetune_mode="freeze", freeze_layers=9)
    with pytest.raises(ConfigError, match="freeze_layers"):
        train_predictor(cfg)
    cfg = _config(tmp_path, pretrained, finetune_mode="freeze", pretrained_predictor_path="")
    with pytest.raises(ConfigError, match="pretrained_predictor_path"):
        train_predictor(cfg)
