"""The fused-projection adapter: a rank's fused weights <-> canonical names, both ways, exactly."""
import pytest
import torch

from megannm.model import fused


class Dims:
    heads, kv_heads, head_dim, ffn = 6, 2, 4, 12


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_and_locate(tp):
    d, a = 8, Dims()
    q, kv, f = a.heads * a.head_dim // tp, a.kv_heads * a.head_dim // tp, a.ffn // tp
    g = torch.Generator().manual_seed(0)
    state = {"layers.0.attn.norm.1.weight": torch.ones(d),
             "layers.0.attn.qkv_proj.1.weight": torch.randn(q + 2 * kv, d, generator=g),
             "3.ffn.gate_up_proj.0.weight": torch.randn(2 * f, d, generator=g)}
    canon = fused.to_canonical(state, a, tp)
    assert list(canon) == ["layers.0.attn.norm.1.weight", "layers.0.attn.q_proj.1.weight",
                           "layers.0.attn.k_proj.1.weight", "layers.0.attn.v_proj.1.weight",
                           "3.ffn.gate_proj.0.weight", "3.ffn.up_proj.0.weight"]
    assert canon["layers.0.attn.k_proj.1.weight"].shape == (kv, d)
    assert torch.equal(canon["layers.0.attn.v_proj.1.weight"], state["layers.0.attn.qkv_proj.1.weight"][q + kv:])
    back = fused.from_canonical(canon)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    name, rows = fused.locate("3.ffn.up_proj.0.weight", a, tp)
    assert name == "3.ffn.gate_up_proj.0.weight" and rows == (f, 2 * f)
    assert fused.locate("layers.0.attn.norm.1.weight", a, tp) == ("layers.0.attn.norm.1.weight", None)


def test_wrong_rows_and_missing_parts_name_the_tensor():
    with pytest.raises(ValueError, match=r"layers.0.attn.qkv_proj.0.weight: 5 rows, expected 40"):
        fused.to_canonical({"layers.0.attn.qkv_proj.0.weight": torch.zeros(5, 8)}, Dims(), 1)
    with pytest.raises(KeyError, match="up_proj"):
        fused.from_canonical({"layers.0.ffn.gate_proj.0.weight": torch.zeros(12, 8)})
