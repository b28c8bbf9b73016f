"""passes.batch_heads: products in a (batch * heads) layout lifted to (batch, heads) at capture."""

from __future__ import annotations

import pytest
import torch

from passes.capture import capture
from passes.discover import discover
from passes.graph import aten, shape
from tests.captures import captured


class BatchHeadScores(torch.nn.Module):
    """Attention whose q, k and v are merged to (batch * heads, seq, head size), scores from
    ``baddbmm`` with a per-head bias (BLOOM's ALiBi) and context from ``bmm``."""

    def __init__(self, alpha: float = 0.25, beta: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.alpha, self.beta = alpha, beta
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.slopes = torch.nn.Parameter(torch.tensor([0.5, 0.25]))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, 2, 8).transpose(1, 2).reshape(b * 2, t, 8)
            for p in (self.q, self.k, self.v)
        )
        positions = torch.arange(t, dtype=x.dtype)
        bias = (self.slopes[None, :, None] * positions).expand(b, 2, t).reshape(b * 2, 1, t)
        scores = bias.baddbmm(q, k.transpose(-1, -2), alpha=self.alpha, beta=self.beta)
        probs = scores.view(b, 2, t, t).softmax(-1)
        ctx = torch.bmm(probs.view(b * 2, t, t), v).view(b, 2, t, 8)
        return {"out": self.o(ctx.transpose(1, 2).reshape(b, t, 16))}


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize(("alpha", "beta"), [(0.25, 1.0), (0.5, 2.0)])
def test_batch_head_products_become_4d_with_the_same_outputs(alpha, beta):
    module = BatchHeadScores(alpha, beta).eval()
    gm = capture(module, {"x": torch.randn(2, 5, 16)})
    assert not _targets(gm) & {aten.bmm.default, aten.baddbmm.default}
    matmuls = [n for n in gm.graph.nodes if n.target is aten.matmul.default]
    assert [len(shape(n)) for n in matmuls] == [4, 4]
    for batch in (2, 3):  # a 3-d input has a dynamic batch only
        x = torch.randn(batch, 5, 16)
        with torch.no_grad():
            torch.testing.assert_close(gm(x=x)["out"], module(x=x)["out"])


def test_the_per_head_bias_is_found_in_the_heads_layout():
    gm = capture(BatchHeadScores().eval(), {"x": torch.randn(2, 5, 16)})
    (block,) = discover(gm).attention
    assert (block.num_heads, block.head_dim, block.kind) == (2, 8, "eager")
    assert block.scale == pytest.approx(0.25) and not block.score_ops
    (bias,) = (n for n in gm.graph.nodes if n.name in block.score_biases)
    assert bias.target is aten.unflatten.int and shape(bias)[1:3] == (2, 1)


class ProductOfProjections(torch.nn.Module):
    """A bmm whose operands are not head merges (projections viewed as 3-d directly)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        y = torch.bmm(self.a(x).view(b * 2, t, 8), self.b(x).view(b * 2, t, 8).transpose(1, 2))
        return {"out": y.view(b, 2, t, t)}


def test_products_of_tensors_not_merged_from_heads_are_left_as_they_are():
    gm = capture(ProductOfProjections().eval(), {"x": torch.randn(2, 5, 16)})
    assert aten.bmm.default in _targets(gm) and aten.matmul.default not in _targets(gm)


def test_eager_attention_in_the_heads_layout_is_unchanged():
    gm = captured("bert-eager")
    assert aten.bmm.default not in _targets(gm)
    assert sum(1 for n in gm.graph.nodes if n.target is aten.matmul.default) == 4


class DisentangledScores(torch.nn.Module):
    """DeBERTa's layout: q, k and v merged to (batch * heads, seq, head size), the keys
    scaled by a constant tensor before the product, and a content-to-position term: the keys'
    projection of position embeddings (batch 1, repeated over the batch) times the queries,
    gathered along positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.positions = torch.nn.Parameter(torch.randn(6, 16))

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y, n):
            return y.view(-1, n, 2, 8).permute(0, 2, 1, 3).contiguous().view(-1, n, 8)

        q, k, v = (heads(p(x), t) for p in (self.q, self.k, self.v))
        pos_k = heads(self.k(self.positions[None]), 6).repeat(b, 1, 1)
        scores = torch.bmm(q, k.transpose(-1, -2) / torch.tensor(8.0).sqrt())
        relative = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        index = (relative.clamp(-3, 2) + 3)[None].expand(b * 2, t, t)
        scores = scores + torch.gather(torch.bmm(q, pos_k.transpose(-1, -2)), -1, index)
        probs = scores.view(-1, 2, t, t).softmax(-1)
        ctx = torch.bmm(probs.view(-1, t, t), v).view(-1, 2, t, 8).permute(0, 2, 1, 3)
        return {"out": self.o(ctx.reshape(b, t, 16))}


def test_disentangled_scores_are_lifted_and_found_with_their_relative_term():
    module = DisentangledScores().eval()
    gm = capture(module, {"x": torch.randn(2, 5, 16)})
    assert aten.bmm.default not in _targets(gm)
    gather = next(n for n in gm.graph.nodes if n.target is aten.gather.default)
    assert len(shape(gather.args[2])) == 4
    for batch in (2, 3):
        x = torch.randn(batch, 5, 16)
        with torch.no_grad():
            torch.testing.assert_close(gm(x=x)["out"], module(x=x)["out"])
    (block,) = discover(gm).attention
    assert block.scale == pytest.approx(8**-0.5)  # the constant tensor's value
    (term,) = block.relative
    assert term.content == "q" and term.projection.weight == block.k.weight
