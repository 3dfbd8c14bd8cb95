"""KronosTokenizer: K-line vectors -> hierarchical (s1, s2) tokens and back (MODEL_ARCHITECTURE_ANALYSIS.md §2-3).

An encoder Transformer maps each normalised time step to a latent vector that Binary Spherical Quantization turns
into ``s1_bits + s2_bits`` sign bits; a decoder Transformer reconstructs the K-line from the bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

from kronos.errors import InputError
from kronos.model.hub import CheckpointMixin
from kronos.model.layers import KVCache, TransformerBlock
from kronos.model.quantizer import BSQuantizer

TokenIds: TypeAlias = "torch.Tensor | Sequence[torch.Tensor]"


class KronosTokenizer(nn.Module, CheckpointMixin):
    """Tokenizer with the official constructor arguments and state-dict layout (the official ``config.json`` fields and
    weight names)."""

    def __init__(
        self,
        d_in: int,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        n_enc_layers: int,
        n_dec_layers: int,
        ffn_dropout_p: float,
        attn_dropout_p: float,
        resid_dropout_p: float,
        s1_bits: int,
        s2_bits: int,
        beta: float,
        gamma0: float,
        gamma: float,
        zeta: float,
        group_size: int,
    ) -> None:
        super().__init__()
        self._record_config(locals())
        self.d_in = d_in
        self.d_model = d_model
        self.s1_bits = s1_bits
        self.s2_bits = s2_bits
        self.codebook_dim = s1_bits + s2_bits
        block: dict[str, Any] = dict(
            d_model=d_model, n_heads=n_heads, ff_dim=ff_dim, ffn_dropout_p=ffn_dropout_p,
            attn_dropout_p=attn_dropout_p, resid_dropout_p=resid_dropout_p,
        )  # fmt: skip
        # Registration order follows the official module (same state dict order and seeded default init).
        self.embed = nn.Linear(d_in, d_model)
        self.head = nn.Linear(d_model, d_in)
        # Q1: the nominal layer counts include the embedding, so n-1 Transformer blocks are built.
        self.encoder = nn.ModuleList([TransformerBlock(**block) for _ in range(n_enc_layers - 1)])
        self.decoder = nn.ModuleList([TransformerBlock(**block) for _ in range(n_dec_layers - 1)])
        self.quant_embed = nn.Linear(d_model, self.codebook_dim)
        self.post_quant_embed_pre = nn.Linear(s1_bits, d_model)
        self.post_quant_embed = nn.Linear(self.codebook_dim, d_model)
        self.tokenizer = BSQuantizer(s1_bits, s2_bits, beta, gamma0, gamma, zeta, group_size)

    def _encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.encoder:
            h = block(h)
        return self.quant_embed(h)

    def _decode_latent(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.decoder:
            h = block(h)
        return self.head(h)

    def forward(self, x: torch.Tensor):
        """Training pass: ``((x_hat_pre, x_hat), bsq_loss, quantized, indices)`` (analysis §2.4).

        ``x_hat_pre`` is reconstructed from the s1 bits alone (scaled by 1/sqrt(K) as in the full code),
        ``x_hat`` from all bits; both share the decoder blocks and head.
        """
        z = self._encode_latent(x)
        bsq_loss, quantized, indices = self.tokenizer(z)
        x_hat_pre = self._decode_latent(self.post_quant_embed_pre(quantized[:, :, : self.s1_bits]))
        x_hat = self._decode_latent(self.post_quant_embed(quantized))
        return (x_hat_pre, x_hat), bsq_loss, quantized, indices

    def encode(self, x: torch.Tensor, half: bool = False) -> TokenIds:
        """Token ids of normalised K-lines ``x [B, L, d_in]``: ``[s1, s2]`` if ``half`` else ``s1 + (s2 << s1_bits)``.

        Q7 note: the caller decides the length; the official predictor encodes the whole history.
        """
        z = self._encode_latent(x)
        _, _, indices = self.tokenizer(z, half=half, compute_loss=False)
        return indices

    def indices_to_bits(self, x: TokenIds, half: bool = False) -> torch.Tensor:
        """Scaled codes ``(2*bit-1)/sqrt(K)`` ``[..., K]`` of token ids (LSB-first bits: Q5)."""
        if half:
            s1, s2 = x[0], x[1]
            # Q5: the official code assumes s1_bits == s2_bits (it uses K//2 bits for both halves).
            m1 = 2 ** torch.arange(self.s1_bits, dtype=torch.long, device=s1.device)
            m2 = 2 ** torch.arange(self.s2_bits, dtype=torch.long, device=s2.device)
            bits = torch.cat([(s1.unsqueeze(-1) & m1) != 0, (s2.unsqueeze(-1) & m2) != 0], dim=-1)
        else:
            mask = 2 ** torch.arange(self.codebook_dim, dtype=torch.long, device=x.device)  # type: ignore[union-attr]
            bits = (x.unsqueeze(-1) & mask) != 0  # type: ignore[union-attr]
        return (bits.float() * 2 - 1) * (1.0 / (self.codebook_dim**0.5))

    def decode(self, x: TokenIds, half: bool = False) -> torch.Tensor:
        """Reconstruct normalised K-lines ``[B, L, d_in]`` from token ids (``[s1, s2]`` when ``half``)."""
        q = self.indices_to_bits(x, half)
        return self._decode_latent(self.post_quant_embed(q))

    def decode_after_prefix(
        self, prefix: TokenIds, suffix: TokenIds, paths: int = 1, half: bool = False
    ) -> torch.Tensor:
        """Decode ``suffix`` tokens that follow a prefix shared by ``paths`` rows: returns ``[B * paths, n, d_in]``.

        ``prefix`` holds ``[B, m]`` token ids (one row per series), ``suffix`` ``[B * paths, n]`` (series-major). The
        result equals ``decode(prefix repeated paths times ++ suffix)[:, m:]`` (the decoder is causal), but the
        prefix runs through the decoder once per series and its keys/values are shared by the paths.
        """
        q_suffix = self.indices_to_bits(suffix, half)
        h = self.post_quant_embed(q_suffix)
        rows, n = h.shape[0], h.shape[1]
        m = (prefix[0] if half else prefix).shape[1]  # type: ignore[union-attr]
        if m == 0:
            return self._decode_latent(h)
        hp = self.post_quant_embed(self.indices_to_bits(prefix, half))
        batch = hp.shape[0]
        if batch * paths != rows:
            raise InputError(f"suffix has {rows} rows; expected {batch} prefix rows x {paths} paths")
        for block in self.decoder:
            attn = block.self_attn
            shared = KVCache(batch, attn.n_heads, attn.head_dim, m, hp.device, hp.dtype)
            hp = block(hp, cache=shared, start_pos=0)
            cache = KVCache(rows, attn.n_heads, attn.head_dim, m + n, h.device, h.dtype)
            cache.share_prefix(shared, m, paths)
            h = block(h, cache=cache, start_pos=m)
        return self.head(h)
