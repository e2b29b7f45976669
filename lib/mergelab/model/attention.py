"""Split attention: an ``nn.MultiheadAttention`` replaced by four ``nn.Linear`` projections.

open_clip's ViT blocks pack q, k and v into one ``in_proj_weight`` (3d × d). The papers (001
Sec. 4 / App. C.2, KnOTS' HF CLIP setup) put separate rank-r LoRA adapters on ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj``. :class:`SplitAttention` computes exactly what the packed
module computes (same math, weights split row-wise from the packed ones) while exposing the four
projections as ordinary ``nn.Linear`` children that PEFT can target (PEFT targeting the ``out_proj``
of an ``nn.MultiheadAttention`` is a silent no-op in forward: the module calls its weight directly,
yet ``merge_and_unload`` merges it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SplitAttention", "split_attention"]


class SplitAttention(nn.Module):
    """Multi-head self/cross attention with separate q/k/v/out ``nn.Linear`` projections.

    Call signature and return value mirror ``nn.MultiheadAttention`` (``(output, None)``), so it is
    a drop-in replacement inside open_clip's ``ResidualAttentionBlock.attention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_packed(cls, mha: nn.MultiheadAttention) -> SplitAttention:
        """Copy an ``nn.MultiheadAttention``'s packed weights into four projections (rows q, k, v)."""
        if not mha._qkv_same_embed_dim:
            raise ValueError("only MultiheadAttention with a packed in_proj_weight can be split")
        split = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first)
        d = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((split.q_proj, split.k_proj, split.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            split.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                split.out_proj.bias.copy_(mha.out_proj.bias)
        return split.to(mha.in_proj_weight.dtype)

    def _heads(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)  # (N, H, L, d_h)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False,
                attn_mask: Tensor | None = None, **_: object) -> tuple[Tensor, None]:
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, d_h)
        out = self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(module: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` below ``module`` by an equivalent :class:`SplitAttention`.

    In place (returns ``module``); packed state-dict names ``attn.in_proj_weight`` become
    ``attn.q_proj.weight`` / ``attn.k_proj.weight`` / ``attn.v_proj.weight``.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, SplitAttention.from_packed(child))
        else:
            split_attention(child)
    return module
