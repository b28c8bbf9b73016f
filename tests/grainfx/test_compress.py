"""grainfx.compress end to end on tiny models: density, exact compact model, monotone masks,
gradient separation, structure regularization, determinism, a learnable task, bad input."""

from __future__ import annotations

import functools
import itertools
import os
import signal
import stat

import pytest
import torch

import grainfx
import passes
from grainfx import BatchError, ConfigError, EmptyDataLoaderError, GrainConfig, TeacherMismatchError
from tests.models import build, build_bert, example_inputs

ARCH = "bert-sdpa"


def data(count: int = 4, batch: int = 4, seq: int = 10, seed: int = 0) -> list[dict]:
    return [example_inputs(ARCH, batch, seq, seed=seed + i) for i in range(count)]


def assert_close(expected: torch.Tensor, actual: torch.Tensor, tol: float = 1e-4) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((expected - actual).abs().max() / scale).item()
    assert err <= tol, f"relative error {err:.2e}"


def heads_kept(masks: dict[str, torch.Tensor]) -> int:
    """Heads with at least one value unit kept."""
    return sum(int(m.bool().any(dim=1).sum()) for name, m in masks.items() if name.endswith(".vo"))


@functools.cache
def run(sparsity: float, steps: int = 20, **config):
    """One compress of the tiny BERT, with every step's masks and the masked eval graph that
    compress rewrote (``result.masked``)."""
    model = build(ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_step: list[dict[str, torch.Tensor]] = []
    result = grainfx.compress(
        model,
        data(),
        sparsity,
        config=GrainConfig(steps=steps, **config),
        progress=False,
        callback=lambda step, masks: per_step.append(masks),
    )
    return result, per_step, result.masked, model, before


# -- density and the compact module -----------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.8, 0.5])
def test_density_hits_target_measured_on_compact_module(sparsity):
    result, _, _, _, _ = run(sparsity)
    structure = result.structure
    compact_params = sum(p.numel() for p in result.module.parameters())
    assert compact_params == structure.count_params(result.masks)
    assert compact_params == result.report["parameters"]["total_after"]
    outside = structure.total_params - structure.unit_params
    measured = (compact_params - outside) / structure.unit_params
    assert measured == pytest.approx(result.density, abs=1e-12)
    assert measured == pytest.approx(structure.density(result.masks), abs=1e-12)
    assert abs(measured - (1 - sparsity)) <= 0.005, measured
    assert result.report["target_density"] == pytest.approx(1 - sparsity)


def test_zero_sparsity_keeps_everything():
    result, per_step, _, _, _ = run(0.0, steps=4)
    assert result.density == 1.0
    assert all(bool((m == 1).all()) for m in result.masks.values())
    assert sum(p.numel() for p in result.module.parameters()) == result.structure.total_params


@pytest.mark.parametrize("sparsity", [0.8, 0.5])
def test_compact_module_equals_masked_student(sparsity):
    result, _, masked_eval, _, _ = run(sparsity)
    assert not masked_eval.training
    for name, mask in passes.get_masks(masked_eval).items():
        assert torch.equal(mask, result.masks[name])
    for batch, seq, seed in [(2, 8, 10), (3, 13, 11), (1, 5, 12)]:
        x = example_inputs(ARCH, batch, seq, seed=seed)
        with torch.no_grad():
            expected = masked_eval(**x)["logits"]
            got = result.module(**x)["logits"]
            again = result.module(**x)["logits"]
        assert got.shape == expected.shape == (batch, 2)
        assert torch.isfinite(got).all()
        assert torch.equal(got, again)
        assert_close(expected, got)


def test_report_layers_match_masks():
    result, _, _, _, _ = run(0.8)
    structure = result.structure
    for layer, block in zip(result.report["layers"], structure.attention, strict=True):
        vo = result.masks[f"{block.name}.vo"].bool()
        qk = result.masks[f"{block.name}.qk"].bool()
        live = vo.any(dim=1)
        assert layer["heads"] == int(live.sum())
        assert sorted(layer["value_units"]) == sorted(int(n) for n in vo.sum(1)[live])
        assert sorted(layer["query_units"]) == sorted(int(n) for n in qk.sum(1)[live])
    for layer, block in zip(result.report["layers"], structure.ffn, strict=True):
        assert layer["ffn"] == int(result.masks[block.name].sum())
    assert result.report["steps"] == 20
    assert len(result.report["kd_loss"]) == 20
    coverage = result.report["coverage"]
    assert coverage == {
        "prunable_share": structure.unit_params / structure.total_params,
        "uncovered": [],
    }
    assert "coverage: " in str(result)


# -- masks over the run ------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.8, 0.5])
def test_masks_only_go_from_kept_to_pruned(sparsity):
    result, per_step, _, _, _ = run(sparsity)
    assert len(per_step) == 20
    ones = result.structure.ones()
    previous = ones
    for step, masks in enumerate(per_step):
        assert masks.keys() == ones.keys()
        for name, mask in masks.items():
            assert bool(((mask == 0) | (mask == 1)).all()), f"step {step}: {name} not binary"
            assert bool((mask <= previous[name]).all()), f"step {step}: {name} revived a unit"
        previous = masks
    for name, mask in per_step[-1].items():
        assert torch.equal(mask, result.masks[name])
    densities = result.report["density_per_step"]
    assert all(b <= a for a, b in itertools.pairwise(densities))
    assert densities[-1] == pytest.approx(result.density)


def test_callback_sees_copies():
    """Changing the masks handed to the callback must not change the run."""
    seen = []

    def vandal(step, masks):
        seen.append(step)
        for m in masks.values():
            m.fill_(1.0)

    reference, _, _, _, _ = run(0.5)
    result = grainfx.compress(
        build(ARCH), data(), 0.5, config=GrainConfig(steps=20), progress=False, callback=vandal
    )
    assert seen == list(range(20))
    for name, mask in reference.masks.items():
        assert torch.equal(mask, result.masks[name])


# -- gradient separation ------------------------------------------------------------------------


@functools.cache
def one_step(**config):
    """Scores and compact module after one step of a dropout-free student distilled from another
    model: no random numbers are drawn in the step, and the logit loss has a gradient at once."""
    student, teacher = build_bert(dropout=0.0), build_bert(dropout=0.0, seed=1)
    return grainfx.compress(
        student,
        data(1),
        0.5,
        teacher=teacher,
        config=GrainConfig(steps=1, **config),
        progress=False,
    )


def test_gradient_separation_scores_ignore_hidden_loss():
    one = one_step(gradient_separation=True, hidden_loss_weight=1.0)
    ten = one_step(gradient_separation=True, hidden_loss_weight=10.0)
    assert one.scores.keys() == ten.scores.keys()
    for name in one.scores:
        assert torch.equal(one.scores[name], ten.scores[name]), name
        assert float(one.scores[name].abs().sum()) > 0, f"{name}: no importance signal at all"
    for name in one.masks:
        assert torch.equal(one.masks[name], ten.masks[name]), name
    # the hidden loss does reach the weights: the two students differ
    x = example_inputs(ARCH, 2, 8, seed=5)
    with torch.no_grad():
        assert not torch.equal(one.module(**x)["logits"], ten.module(**x)["logits"])


def test_gradient_separation_scores_equal_logit_loss_only():
    separated = one_step(gradient_separation=True, hidden_loss_weight=1.0)
    no_hidden = one_step(hidden_loss=False)
    for name in separated.scores:
        assert torch.allclose(separated.scores[name], no_hidden.scores[name], rtol=1e-5, atol=0), (
            name
        )


def test_without_gradient_separation_scores_see_hidden_loss():
    one = one_step(gradient_separation=False, hidden_loss_weight=1.0)
    ten = one_step(gradient_separation=False, hidden_loss_weight=10.0)
    separated = one_step(gradient_separation=True, hidden_loss_weight=1.0)
    for name in one.scores:
        change = (one.scores[name] - ten.scores[name]).abs().max() / one.scores[name].abs().max()
        assert change > 1e-3, f"{name}: the hidden-loss weight did not change the scores"
        change = (one.scores[name] - separated.scores[name]).abs().max() / one.scores[
            name
        ].abs().max()
        assert change > 1e-3, f"{name}: the hidden loss did not change the scores"


# -- structure regularization -------------------------------------------------------------------


def test_structure_regularization_leaves_fewer_heads():
    """8 heads of 8 per layer, 90% sparsity: with the regularization, small heads empty first.

    A short EMA (beta 0.5) lets the per-step tanh(D / alpha) factor act within 40 steps; at
    seeds 0..5 the counts were 6-10 heads with it against 11-15 without it.
    """
    model = build_bert(hidden=64, heads=8, seed=0)
    batches = data(4, seed=0)
    results = {}
    for regularize in (True, False):
        config = GrainConfig(
            steps=40,
            hidden_loss=False,
            prune_start=0.0,
            prune_end=0.8,
            ema_beta=0.5,
            structure_regularization=regularize,
        )
        results[regularize] = grainfx.compress(model, batches, 0.9, config=config, progress=False)
    with_reg, without = results[True], results[False]
    for r in (with_reg, without):
        assert 0.09 <= r.density <= 0.1
    assert heads_kept(with_reg.masks) < heads_kept(without.masks), (
        heads_kept(with_reg.masks),
        heads_kept(without.masks),
    )
    assert sum(layer["heads"] for layer in with_reg.report["layers"]) == heads_kept(with_reg.masks)


def test_latency_aware_run_records_its_prices_and_keeps_fewer_query_heads():
    """The same run with and without latency-aware ranking: the prices are measured and
    reported, the density is the same, and fewer heads keep query units."""
    plain, *_ = run(0.8)
    aware, *_ = run(0.8, latency_aware=True, latency_shape=(2, 16))
    assert plain.report.get("latency_prices") is None
    prices = aware.report["latency_prices"]
    assert set(prices) == {b.mask_names()["qk"] for b in aware.structure.attention}
    assert all(p > 0 for p in prices.values())
    assert abs(aware.density - plain.density) < 0.02

    def with_queries(result):
        return sum(int(result.masks[name].any(dim=-1).sum()) for name in prices)

    assert with_queries(aware) <= with_queries(plain)


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_same_masks():
    first, first_steps, _, _, _ = run(0.5)
    second = grainfx.compress(
        build(ARCH), data(), 0.5, config=GrainConfig(steps=20), progress=False
    )
    for name in first.masks:
        assert torch.equal(first.masks[name], second.masks[name]), name
        assert torch.equal(first.scores[name], second.scores[name]), name
    x = example_inputs(ARCH, 2, 8, seed=3)
    with torch.no_grad():
        assert torch.equal(first.module(**x)["logits"], second.module(**x)["logits"])


# -- a task with real signal --------------------------------------------------------------------


def token_task(n: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Label 1 when token 5 occurs in the sequence (exactly once), 0 when it does not."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 99, (n, seq), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    where = torch.randint(0, seq, (n,), generator=gen)
    positive = labels.bool()
    ids[positive, where[positive]] = 5
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def accuracy(module, batch) -> float:
    with torch.no_grad():
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out["logits"] if isinstance(out, dict) else out.logits
    return (logits.argmax(-1) == batch["labels"]).float().mean().item()


def test_compressed_student_keeps_a_learned_task():
    torch.manual_seed(0)
    model = build_bert(seed=0, init_std=0.02).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(200):
        loss = model(**token_task(32, 8, seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = token_task(512, 8, seed=10**6)
    assert accuracy(model, held_out) > 0.95  # the teacher learned it

    batches = [token_task(32, 8, seed=5000 + i) for i in range(8)]  # labels are ignored
    result = grainfx.compress(
        model, batches, 0.5, config=GrainConfig(steps=30, learning_rate=1e-3), progress=False
    )
    assert abs(result.density - 0.5) <= 0.005
    assert accuracy(result.module, held_out) > 0.8


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "x", None, True])
def test_bad_sparsity(sparsity):
    with pytest.raises(ConfigError, match="sparsity"):
        grainfx.compress(
            build(ARCH), data(1), sparsity, config=GrainConfig(steps=1), progress=False
        )


def test_empty_dataloader():
    with pytest.raises(EmptyDataLoaderError, match="no batch"):
        grainfx.compress(build(ARCH), [], 0.5, config=GrainConfig(steps=1), progress=False)


def test_batch_with_wrong_key_names():
    x = example_inputs(ARCH, 2, 8)
    batch = {"ids": x["input_ids"], "mask": x["attention_mask"]}
    with pytest.raises(BatchError, match="argument names") as info:
        grainfx.compress(build(ARCH), [batch], 0.5, config=GrainConfig(steps=1), progress=False)
    assert "'ids'" in str(info.value)


def test_batch_that_is_not_a_dict():
    x = example_inputs(ARCH, 2, 8)
    with pytest.raises(BatchError, match="dicts of tensors"):
        grainfx.compress(
            build(ARCH),
            [(x["input_ids"], x["attention_mask"])],
            0.5,
            config=GrainConfig(steps=1),
            progress=False,
        )


def test_batch_entry_not_a_tensor():
    with pytest.raises(BatchError, match="'input_ids' is not a tensor"):
        grainfx.compress(
            build(ARCH),
            [{"input_ids": [[3, 4, 5]]}],
            0.5,
            config=GrainConfig(steps=1),
            progress=False,
        )


class MLP(torch.nn.Module):
    """Embedding, two linear layers, mean over the sequence: nothing to prune."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.down(torch.relu(self.up(self.embed(input_ids)))).mean(1)}


def test_model_without_attention():
    with pytest.raises(passes.NoAttentionFoundError, match="no attention"):
        grainfx.compress(MLP(), data(1), 0.5, config=GrainConfig(steps=1), progress=False)


@pytest.mark.parametrize("hidden_loss", [True, False])
def test_teacher_with_other_labels(hidden_loss):
    teacher = build_bert(num_labels=3)
    with pytest.raises(TeacherMismatchError, match=r"\(2, 3\).*\(2, 2\)"):
        grainfx.compress(
            build(ARCH),
            [example_inputs(ARCH, 2, 8)],
            0.5,
            teacher=teacher,
            config=GrainConfig(steps=1, hidden_loss=hidden_loss),
            progress=False,
        )


def test_user_model_not_modified():
    _, _, _, model, before = run(0.5)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def _tensors(*models: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones included) of ``models``, copied, with
    each parameter's requires_grad."""
    out = {}
    for i, model in enumerate(models):
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            out[f"{i}.{name}"] = t.detach().clone()
            out[f"{i}.{name}.requires_grad"] = torch.tensor(t.requires_grad)
    return out


def test_model_and_teacher_not_modified_by_a_checkpointed_run(tmp_path):
    """Every parameter and buffer of the model and of the teacher, after a run with
    embedding factorization, a teacher of its own, a checkpoint and dropout on."""
    model, teacher = build_bert(seed=1), build_bert(seed=2)
    model.train()
    before = _tensors(model, teacher)
    assert any(".position_ids" in k or "token_type_ids" in k for k in before)  # non-persistent
    grainfx.compress(
        model,
        data(),
        0.6,
        teacher=teacher,
        progress=False,
        config=GrainConfig(steps=8, embedding_rank=8),
        checkpoint=grainfx.CheckpointConfig(tmp_path / "c.pt", every=3),
    )
    after = _tensors(model, teacher)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert model.training and not teacher.training
    assert all(p.grad is None for p in [*model.parameters(), *teacher.parameters()])


def test_one_shot_iterator_does_not_hang():
    """A generator can be iterated once: compress must train on it or say why it cannot,
    not loop forever looking for the next batch."""

    def timeout(signum, frame):
        raise TimeoutError("compress did not return within 20 s on a one-shot iterator")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        try:
            result = grainfx.compress(
                build(ARCH), iter(data(2)), 0.5, config=GrainConfig(steps=4), progress=False
            )
        except passes.PassError as exc:  # an explained refusal is fine too
            assert "iter" in str(exc) or "dataloader" in str(exc)
        else:
            assert result.report["steps"] <= 4
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_dataloader_without_len_needs_steps():
    class Batches:
        def __iter__(self):
            return iter(data(2))

    with pytest.raises(ConfigError, match="steps"):
        grainfx.compress(build(ARCH), Batches(), 0.5, config=GrainConfig(), progress=False)


def test_embedding_factorization_is_trained_and_counted():
    plain, _, _, _, _ = run(0.5)
    result, _, masked, _, _ = run(0.5, embedding_rank=8)
    params = result.report["parameters"]
    assert params["total_after"] == sum(p.numel() for p in result.module.parameters())
    assert params["total_before"] == plain.report["parameters"]["total_before"]
    saved = plain.report["parameters"]["outside_encoder"] - params["outside_encoder"]
    vocab = masked.grain_embedding.table.shape[0]
    hidden = masked.grain_embedding.projection.shape[0]
    assert saved == vocab * hidden - (vocab * 8 + 8 * hidden)
    x = example_inputs(ARCH, 3, 9, seed=5)
    with torch.no_grad():
        assert_close(masked(**x)["logits"], result.module(**x)["logits"])


def test_warns_when_scores_are_flat_because_the_student_equals_the_teacher():
    data_ = [example_inputs(ARCH, 4, 10, seed=i) for i in range(4)]
    with pytest.warns(RuntimeWarning, match="importance scores are all ~0"):
        grainfx.compress(
            build_bert(dropout=0.0),
            data_,
            0.5,
            config=GrainConfig(steps=6, hidden_loss=False),
            progress=False,
        )


class LogitsOnly(torch.nn.Module):
    """A model whose forward returns a bare tensor (its output is named "output")."""

    def __init__(self):
        super().__init__()
        self.inner = build(ARCH)

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def test_a_model_returning_a_tensor_is_distilled_on_it():
    result = grainfx.compress(
        LogitsOnly(), data(), 0.5, config=GrainConfig(steps=4), progress=False
    )
    x = example_inputs(ARCH, 2, 8, seed=3)
    with torch.no_grad():
        assert list(result.module(**x)) == ["output"]
        assert_close(result.masked(**x)["output"], result.module(**x)["output"])


def test_output_name_picks_the_output_to_distil():
    from transformers import BertModel

    encoder = BertModel(build(ARCH).config).eval()  # last_hidden_state, pooler_output
    with pytest.raises(ConfigError, match="output_name"):
        grainfx.compress(encoder, data(), 0.5, config=GrainConfig(steps=2), progress=False)
    with pytest.raises(ConfigError, match="not an output"):
        grainfx.compress(
            encoder, data(), 0.5, config=GrainConfig(steps=2, output_name="logits"), progress=False
        )
    result = grainfx.compress(
        encoder,
        data(),
        0.5,
        config=GrainConfig(steps=2, output_name="pooler_output"),
        progress=False,
    )
    assert abs(result.density - 0.5) < 0.01


def test_check_runs_the_preflight_and_finds_a_bad_batch_anywhere():
    model = build(ARCH)
    batches = data(3)
    structure = grainfx.check(model, batches, 0.5, config=GrainConfig(steps=2))
    assert len(structure.attention) == 2 and len(structure.ffn) == 2
    batches[2] = {"input_ids": batches[2]["input_ids"]}
    with pytest.raises(BatchError, match=r"a batch lacks \['attention_mask'\]"):
        grainfx.check(model, batches, 0.5, config=GrainConfig(steps=2))


def test_result_save_writes_files_with_the_users_permissions(tmp_path):
    result = run(0.5)[0]
    path = result.save(tmp_path / "compact.pt2")
    mask = os.umask(0)
    os.umask(mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "compact.json",
        "compact.pt2",
        "compact.report.json",
    ]
    for file in tmp_path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name
    kept = grainfx.load(path).grainfx_kept
    assert kept == result.module.grainfx_kept.with_inputs(result.module.grainfx_example_inputs)


def test_compress_t5_distils_the_decoders_logits():
    """A tiny Flan-T5 (encoder, causal decoder, cross-attention, gated FFN, relative position
    bias shared across layers) compressed end to end: density reached, compact = masked."""
    arch = "flan_t5-sdpa"
    batches = [example_inputs(arch, 4, 10, seed=i) for i in range(4)]
    result = grainfx.compress(
        build(arch), batches, 0.5, config=GrainConfig(steps=8), progress=False
    )
    assert abs(result.density - 0.5) <= 0.01
    assert len(result.report["layers"]) == 6  # encoder self, decoder self and cross
    x = example_inputs(arch, 3, 13, seed=9)
    with torch.no_grad():
        logits = result.module(**x)["logits"]
        assert logits.shape == (3, 7, 100)
        assert_close(result.masked(**x)["logits"], logits)


def test_compress_deberta_v3_prunes_through_its_relative_terms(tmp_path):
    """A tiny DeBERTa-v3 classifier (disentangled attention: content-to-position and
    position-to-content terms read W_Q / W_K) compressed end to end: density reached, compact
    = masked, and the saved file reloads with the same outputs."""
    arch = "deberta_v3-eager"
    batches = [example_inputs(arch, 4, 10, seed=i) for i in range(4)]
    result = grainfx.compress(
        build(arch), batches, 0.7, config=GrainConfig(steps=6), progress=False
    )
    assert abs(result.density - 0.3) <= 0.01
    x = example_inputs(arch, 3, 13, seed=9)
    loaded = grainfx.load(result.save(tmp_path / "deberta.pt2"))
    with torch.no_grad():
        logits = result.module(**x)["logits"]
        assert_close(result.masked(**x)["logits"], logits)
        assert torch.equal(loaded(**x)["logits"], logits)


def test_auto_ema_beta_runs_and_follows_the_run_length():
    result, *_ = run(0.5, steps=20, ema_beta="auto")
    assert abs(result.density - 0.5) <= 0.02
    assert result.report["config"]["ema_beta"] == "auto"


def _token_batches(labeled: int) -> list[dict]:
    """Token-classification batches whose labels mark only the first ``labeled`` positions."""
    batches = []
    for i in range(4):
        x = example_inputs("bert-sdpa", 4, 10, seed=i)
        labels = torch.full_like(x["input_ids"], -100)
        labels[:, :labeled] = 1
        batches.append({**x, "labels": labels})
    return batches


def _token_model():
    import transformers as T

    config = T.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # the train graph is deterministic
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return T.BertForTokenClassification(config).eval()


@pytest.mark.parametrize("positions", ["labeled", "all"])
def test_token_classification_distils_the_labeled_positions(positions):
    """With kd_positions="labeled" the logit loss reads only positions whose label is not
    -100: the first KD loss equals the soft cross-entropy over those positions alone."""
    from grainfx.compress import _model_inputs, prepare
    from grainfx.distill import kd_loss

    model, batches = _token_model(), _token_batches(labeled=3)
    config = GrainConfig(steps=4, kd_positions=positions, hidden_loss=False)
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    trainer = prepare(model, inputs, 0.5, teacher=None, config=config, total_steps=4)
    batch = _model_inputs(batches[0], trainer.student.input_names, positions == "labeled")
    kd, _ = trainer.losses(batch)
    with torch.no_grad():
        student = trainer.student.train(**inputs)["logits"]
        teacher = model(**inputs).logits
    cut = slice(0, 3) if positions == "labeled" else slice(None)
    mask = inputs["attention_mask"][:, cut]
    expected = kd_loss(student[:, cut], teacher[:, cut], config.temperature, mask)
    assert kd.item() == pytest.approx(expected.item(), rel=1e-4)
    result = grainfx.compress(model, batches, 0.5, config=config, progress=False)
    assert result.report["config"]["kd_positions"] == positions
