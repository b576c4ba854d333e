"""Losses: exact formulas against naive references, masking, schedules, and 2 ranks == 1 rank."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peg.config import ListwiseConfig, LossConfig, ProgressiveConfig
from peg.losses import (
    InfoNCELoss,
    ListwiseDistillationLoss,
    MatryoshkaLoss,
    ProgressiveInfoNCELoss,
    build_loss,
    passage_ids_from_texts,
    positive_columns,
    schedule_fraction,
    self_paced_weights,
)

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
from losses_cases import PER_QUERY, QUERIES, ToyEncoder, global_batch, loss_extra, make_losses  # noqa: E402


def embeddings(num_queries: int = 3, hard_negatives: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_queries, dim, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(num_queries * (1 + hard_negatives), dim, generator=g, dtype=torch.float64), dim=-1)
    return q.requires_grad_(), p.requires_grad_()


def labelled_passages(num_queries: int, hard_negatives: int) -> list[tuple[str, int]]:
    """The batch layout spelled out: ('pos', i), ('neg', i), ... per query."""
    return [(kind, i) for i in range(num_queries) for kind in ["pos"] + ["neg"] * hard_negatives]


def naive_infonce(q, p, tau, labels, queries=None, masked=frozenset(), hardness=0.0):
    """-log softmax at the positive, written out per query; `masked` holds (query, column) pairs."""
    total = []
    for i in queries if queries is not None else range(q.size(0)):
        target = labels.index(("pos", i))
        logits = []
        for j in range(p.size(0)):
            s = q[i] @ p[j]
            extra = hardness * s.detach() / tau if j != target else 0.0
            logits.append(s / tau + extra if (i, j) not in masked else torch.tensor(float("-inf"), dtype=q.dtype))
        total.append(-(logits[target] - torch.logsumexp(torch.stack(logits), dim=0)))
    return torch.stack(total)


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_infonce_equals_per_query_reference_with_several_hard_negatives():
    q, p = embeddings(num_queries=3, hard_negatives=2)
    loss = InfoNCELoss(temperature=0.05)(q, p)
    reference = naive_infonce(q, p, 0.05, labelled_passages(3, 2)).mean()
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads_of(loss, q, p), grads_of(reference, q, p), strict=True):
        torch.testing.assert_close(got, want)


def test_positive_columns_follow_the_per_query_layout_with_an_offset():
    labels = labelled_passages(6, 3)
    want = [labels.index(("pos", i)) for i in range(3, 6)]  # rank 1 of 2, 3 queries each
    assert positive_columns(3, 4, query_offset=3).tolist() == want


def test_duplicates_are_masked_only_with_passage_ids():
    q, p = embeddings(num_queries=3, hard_negatives=2)
    with torch.no_grad():
        p[1] = p[3]  # query 0's hard negative is query 1's positive text
        p[8] = p[2]  # query 0's and query 2's hard negatives are one passage
    texts = ["a", "b", "c", "b", "d", "e", "f", "g", "c"]
    ids = passage_ids_from_texts(texts)
    labels = labelled_passages(3, 2)
    masked_loss = InfoNCELoss(0.05)(q, p, passage_ids=ids)
    # query 1 drops column 1 (a copy of its positive); queries 0 and 2 count "b" once (column 1)
    # and "c" once (column 2)
    masked = {(1, 1), (0, 3), (2, 3), (0, 8), (1, 8), (2, 8)}
    torch.testing.assert_close(masked_loss, naive_infonce(q, p, 0.05, labels, masked=masked).mean())
    plain = InfoNCELoss(0.05)(q, p)
    torch.testing.assert_close(plain, naive_infonce(q, p, 0.05, labels).mean())
    assert not torch.allclose(masked_loss, plain)


def test_a_positive_repeated_earlier_in_the_batch_keeps_its_own_column():
    q, p = embeddings(num_queries=2, hard_negatives=1)
    with torch.no_grad():
        p[1] = p[2]  # query 0's negative (column 1) is query 1's positive (column 2)
    ids = torch.tensor([10, 11, 11, 12])
    value = InfoNCELoss(0.05)(q, p, passage_ids=ids)
    want = naive_infonce(q, p, 0.05, labelled_passages(2, 1), masked={(1, 1), (0, 2)}).mean()
    torch.testing.assert_close(value, want)


@pytest.mark.slow
def test_passage_ids_are_equal_exactly_for_equal_texts_and_stable_across_processes():
    ids = passage_ids_from_texts(["x", "y", "x"])
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1]
    code = "from peg.losses import passage_ids_from_texts as f; print(f(['x', 'y']).tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == str(ids[:2].tolist())


def test_bad_shapes_are_clear_errors():
    q, p = embeddings(num_queries=3, hard_negatives=2)
    with pytest.raises(ValueError, match="do not split into 3 queries"):
        InfoNCELoss()(q, p[:-1])
    with pytest.raises(ValueError, match=r"passage_ids must have shape \[9\]"):
        InfoNCELoss()(q, p, passage_ids=torch.arange(8))


def test_progressive_switched_off_is_plain_infonce_bit_for_bit():
    q, p = embeddings(num_queries=4, hard_negatives=3)
    ids = torch.arange(16)
    plain = InfoNCELoss(0.02)(q, p, passage_ids=ids)
    off = ProgressiveInfoNCELoss(0.02, beta_start=0.0, beta_end=0.0, self_paced=False)
    off.set_progress(7, 10)
    progressive = off(q, p, passage_ids=ids)
    assert torch.equal(progressive, plain)
    for got, want in zip(grads_of(progressive, q, p), grads_of(plain, q, p), strict=True):
        assert torch.equal(got, want)


def test_progressive_at_full_pace_and_zero_beta_equals_infonce():
    q, p = embeddings(num_queries=5, hard_negatives=2)
    loss = ProgressiveInfoNCELoss(0.05, beta_start=-1.0, beta_end=0.0, self_paced=True, pace_start=0.2)
    loss.set_progress(9, 10)  # last step: beta = 0, pace = 1
    value = loss(q, p)
    assert loss.last_stats["beta"] == 0.0 and loss.last_stats["pace"] == 1.0
    torch.testing.assert_close(value, InfoNCELoss(0.05)(q, p))


def test_progressive_negative_hardness_matches_its_formula():
    q, p = embeddings(num_queries=3, hard_negatives=2)
    loss = ProgressiveInfoNCELoss(0.05, beta_start=-0.5, beta_end=1.5, self_paced=False)
    loss.set_progress(3, 5)  # linear: -0.5 + 2.0 * 3/4
    assert loss.beta() == pytest.approx(1.0)
    value = loss(q, p)
    reference = naive_infonce(q, p, 0.05, labelled_passages(3, 2), hardness=1.0).mean()
    torch.testing.assert_close(value, reference)
    for got, want in zip(grads_of(value, q, p), grads_of(reference, q, p), strict=True):
        torch.testing.assert_close(got, want)


def test_negative_beta_shifts_gradient_away_from_the_hardest_negative():
    q, p = embeddings(num_queries=1, hard_negatives=4, seed=3)
    scores = (q @ p.T).detach()[0]
    hardest = 1 + int(scores[1:].argmax())
    easiest = 1 + int(scores[1:].argmin())

    def share(beta):
        loss = ProgressiveInfoNCELoss(0.05, beta_start=beta, beta_end=beta, self_paced=False)
        (grad_p,) = torch.autograd.grad(loss(q, p), p)
        norms = grad_p.norm(dim=-1)
        return norms[hardest] / norms[easiest]

    assert share(-0.5) < share(0.0) < share(1.0)


@pytest.mark.parametrize(
    ("kind", "step", "total", "want"),
    [
        ("linear", 0, 11, 0.0), ("linear", 5, 11, 0.5), ("linear", 10, 11, 1.0), ("linear", 20, 11, 1.0),
        ("cosine", 0, 5, 0.0), ("cosine", 1, 5, (1 - math.cos(math.pi / 4)) / 2), ("cosine", 2, 5, 0.5),
        ("cosine", 4, 5, 1.0),
        ("step", 0, 13, 0.0), ("step", 2, 13, 0.0), ("step", 3, 13, 1 / 3), ("step", 6, 13, 2 / 3),
        ("step", 9, 13, 1.0), ("step", 12, 13, 1.0),
    ],
)
def test_schedule_values_at_known_steps(kind, step, total, want):
    assert schedule_fraction(kind, step, total, stages=4) == pytest.approx(want, abs=1e-12)


def test_beta_and_pace_follow_the_schedule():
    loss = ProgressiveInfoNCELoss(beta_start=-0.5, beta_end=1.0, schedule="linear", pace_start=0.4)
    assert (loss.beta(), loss.pace()) == (-0.5, 0.4)  # before set_progress: step 0
    loss.set_progress(5, 11)
    assert loss.beta() == pytest.approx(0.25) and loss.pace() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        loss.set_progress(0, 0)


def test_self_paced_weights_have_mean_one_and_favour_easy_queries():
    losses = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 5
    for pace in (0.1, 0.5, 0.9):
        w = self_paced_weights(losses, pace, sharpness=2.0)
        torch.testing.assert_close(w.mean(), torch.tensor(1.0))
        order = losses.argsort()
        assert (w[order][1:] <= w[order][:-1] + 1e-6).all()  # non-increasing in the loss
        easy = losses <= torch.quantile(losses, pace)
        torch.testing.assert_close(w[easy], torch.full_like(w[easy], float(w.max())))
        assert w.min() < w.max()
    assert torch.equal(self_paced_weights(losses, 1.0, 2.0), torch.ones(64))


def test_progressive_logs_beta_and_weight_statistics():
    q, p = embeddings(num_queries=8, hard_negatives=1)
    loss = ProgressiveInfoNCELoss(0.05, beta_start=-0.5, beta_end=1.0, pace_start=0.3)
    loss.set_progress(2, 10)
    loss(q, p)
    stats = loss.last_stats
    assert set(stats) >= {"beta", "pace", "threshold", "weight_mean", "weight_min", "weight_max", "weight_std", "loss"}
    assert stats["weight_mean"] == pytest.approx(1.0) and stats["weight_min"] < 1.0 < stats["weight_max"]
    assert stats["beta"] == pytest.approx(-0.5 + 1.5 * 2 / 9)


def naive_listwise(q, p, teacher, list_size, tau_t=0.3, tau_s=0.05, tau_nce=0.01, weight=0.1, ratio=0.6):
    labels = labelled_passages(q.size(0), list_size - 1)
    kl, masked = [], set()
    for i in range(q.size(0)):
        t = teacher[i].double()
        t = (t - t.min()) / (t.max() - t.min())
        s = torch.stack([q[i] @ p[i * list_size + j] for j in range(list_size)]).double()
        pt, ps = torch.softmax(t / tau_t, 0), torch.softmax(s / tau_s, 0)
        kl.append((pt * (pt.log() - ps.log())).sum())
        masked |= {(i, i * list_size + j) for j in range(1, list_size) if t[j] > ratio * t.max()}
    nce = naive_infonce(q, p, tau_nce, labels, masked=masked).mean()
    kl = torch.stack(kl).mean()
    return kl + weight * nce, kl.detach(), nce.detach()


def test_listwise_equals_its_formula_with_the_false_negative_mask():
    q, p = embeddings(num_queries=3, hard_negatives=3)
    teacher = torch.tensor([[5.0, 1.0, 4.5, 0.0], [2.0, 1.0, 0.5, 0.2], [0.9, 0.95, 0.1, 0.3]])
    loss_fn = ListwiseDistillationLoss()
    value = loss_fn(q, p, teacher_scores=teacher)
    reference, kl, nce = naive_listwise(q, p, teacher, 4)
    torch.testing.assert_close(value, reference)
    assert loss_fn.last_stats["kl"] == pytest.approx(float(kl))
    assert loss_fn.last_stats["nce"] == pytest.approx(float(nce))
    assert loss_fn.last_stats["masked_false_negatives"] == pytest.approx(2 / 3)  # (0, 2) and (2, 1)
    for got, want in zip(grads_of(value, q, p), grads_of(reference, q, p), strict=True):
        torch.testing.assert_close(got, want)
    unmasked = naive_listwise(q, p, teacher, 4, ratio=1.0)[2]
    assert not torch.allclose(nce, unmasked)


def test_listwise_without_or_with_misaligned_teacher_scores_is_a_clear_error():
    q, p = embeddings(num_queries=2, hard_negatives=2)
    with pytest.raises(ValueError, match="needs teacher_scores"):
        ListwiseDistillationLoss()(q, p)
    with pytest.raises(ValueError, match=r"teacher_scores must have shape \[2, 3\]"):
        ListwiseDistillationLoss()(q, p, teacher_scores=torch.rand(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        ListwiseDistillationLoss()(q, p, teacher_scores=torch.tensor([[1.0, float("nan"), 0.0], [1.0, 0.0, 0.0]]))


# A value other than the default for every field of the loss sections; build_loss must hand each to the loss.
PROGRESSIVE = {"beta_start": -0.25, "beta_end": 0.75, "schedule": "step", "stages": 3, "self_paced": False,
               "pace_start": 0.25, "pace_sharpness": 3.0}
LISTWISE = {"teacher_temperature": 0.2, "student_temperature": 0.07, "nce_weight": 0.3, "nce_temperature": 0.02,
            "false_negative_ratio": 0.5}


def test_the_cases_below_cover_every_loss_field():
    assert set(ProgressiveConfig.model_fields) == {"enabled", *PROGRESSIVE}
    assert set(ListwiseConfig.model_fields) == set(LISTWISE)
    assert set(LossConfig.model_fields) == {"kind", "temperature", "progressive", "listwise", "matryoshka_dims",
                                            "matryoshka_weights"}
    defaults = ProgressiveConfig(), ListwiseConfig()
    assert all(getattr(defaults[0], k) != v for k, v in PROGRESSIVE.items())
    assert all(getattr(defaults[1], k) != v for k, v in LISTWISE.items())


def test_build_loss_from_config():
    assert type(build_loss(LossConfig())) is InfoNCELoss
    assert build_loss(LossConfig(temperature=0.02)).temperature == 0.02
    config = LossConfig(temperature=0.02, progressive=ProgressiveConfig(enabled=True, **PROGRESSIVE))
    progressive = build_loss(config)
    assert isinstance(progressive, ProgressiveInfoNCELoss) and progressive.temperature == 0.02
    assert {k: getattr(progressive, k) for k in PROGRESSIVE} == PROGRESSIVE
    listwise = build_loss(LossConfig(kind="listwise", listwise=ListwiseConfig(**LISTWISE)))
    assert isinstance(listwise, ListwiseDistillationLoss)
    assert {k: getattr(listwise, k) for k in LISTWISE} == LISTWISE
    matryoshka = build_loss(LossConfig(matryoshka_dims=[8, 4], matryoshka_weights=[1.0, 0.5]), normalize=False)
    assert isinstance(matryoshka, MatryoshkaLoss) and type(matryoshka.inner) is InfoNCELoss
    assert (matryoshka.dims, matryoshka.weights, matryoshka.normalize) == ([8, 4], [1.0, 0.5], False)


def one_rank_reference(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = global_batch()
    model = ToyEncoder()
    loss = make_losses()[name](model(batch["q"]), model(batch["p"]), **loss_extra(name, batch))
    loss.backward()
    return {n: prm.grad for n, prm in model.named_parameters()}, loss.detach()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "results.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(SCRIPTS / "losses_ranks.py"), str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["infonce", "progressive", "listwise", "matryoshka"])
def test_two_ranks_with_half_batches_give_the_one_rank_gradient(two_rank_results, name):
    want, full_loss = one_rank_reference(name)
    got = two_rank_results[name]["grads"]
    for pname, grad in want.items():
        torch.testing.assert_close(got[pname], grad, rtol=1e-5, atol=1e-6)
    # the mean of the per-rank losses is the full-batch loss
    torch.testing.assert_close(two_rank_results[name]["rank_losses"].mean(), full_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_each_rank_targets_its_own_positives_among_gathered_passages(two_rank_results):
    """2 ranks x 4 queries x 2 hard negatives: each rank's loss equals the spelled-out reference."""
    batch = global_batch()
    model = ToyEncoder()
    with torch.no_grad():
        q, p = model(batch["q"]), model(batch["p"])
    labels = labelled_passages(QUERIES, PER_QUERY - 1)
    # query 5's first negative (column 16) repeats query 1's positive (column 3): a false
    # negative for query 1, a repeat counted once (column 3) for every other query
    masked = {(i, 5 * PER_QUERY + 1) for i in range(QUERIES)}
    for rank in range(2):
        queries = range(rank * 4, rank * 4 + 4)
        want = naive_infonce(q, p, 0.05, labels, queries=queries, masked=masked).mean()
        torch.testing.assert_close(two_rank_results["infonce"]["rank_losses"][rank], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_progressive_weights_are_global_across_ranks(two_rank_results):
    stats = two_rank_results["progressive"]["stats"]
    assert stats["weight_mean"] == pytest.approx(1.0) and stats["weight_min"] < stats["weight_max"]


@pytest.mark.slow
def test_a_batch_that_does_not_divide_across_ranks_is_a_clear_error(two_rank_results):
    assert "same number of queries and passages" in two_rank_results["uneven_error"]
    assert "[(4, 12), (3, 9)]" in two_rank_results["uneven_error"]


@pytest.mark.parametrize("name", ["infonce", "listwise"])
def test_matryoshka_is_the_weighted_sum_over_renormalised_prefixes(name):
    q, p = embeddings(num_queries=3, hard_negatives=2, dim=8)
    inner = make_losses()[name]
    extra = {"passage_ids": torch.arange(9)}
    if name == "listwise":
        extra["teacher_scores"] = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.5, 0.1], [1.0, 0.0, 0.5]])
    loss = MatryoshkaLoss(inner, dims=[4, 8, 2], weights=[0.5, 1.0, 0.25])
    got = loss(q, p, **extra)
    want = sum(
        w * inner(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), **extra)
        for d, w in ((8, 1.0), (4, 0.5), (2, 0.25))
    )
    torch.testing.assert_close(got, want)
    for a, b in zip(grads_of(got, q, p), grads_of(want, q, p)):
        torch.testing.assert_close(a, b)
    assert loss.dims == [8, 4, 2] and set(loss.last_stats) >= {"loss", "loss_dim8", "loss_dim4", "loss_dim2"}
    # the prefixes are renormalised: scoring the raw prefixes gives another loss
    raw = sum(w * inner(q[:, :d], p[:, :d], **extra) for d, w in ((8, 1.0), (4, 0.5), (2, 0.25)))
    assert not torch.allclose(got, raw)


def test_matryoshka_passes_progress_to_its_inner_loss_and_checks_its_dims():
    inner = ProgressiveInfoNCELoss()
    loss = MatryoshkaLoss(inner, dims=[4])
    loss.set_progress(7, 10)
    assert (inner.step, inner.total_steps) == (7, 10)
    q, p = embeddings(dim=2)
    with pytest.raises(ValueError, match="exceeds the embedding dimension 2"):
        loss(q, p)
    for dims, weights in (([4, 4], None), ([0], None), ([4, 2], [1.0]), ([4], [0.0])):
        with pytest.raises(ValueError, match="matryoshka"):
            MatryoshkaLoss(InfoNCELoss(), dims, weights)


def test_build_loss_wraps_in_matryoshka_when_dims_are_set():
    loss = build_loss(LossConfig(kind="listwise", matryoshka_dims=[16, 8], matryoshka_weights=[1.0, 0.5]), normalize=False)
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.inner, ListwiseDistillationLoss)
    assert (loss.dims, loss.weights, loss.normalize) == ([16, 8], [1.0, 0.5], False)
    assert loss.passage_extras == loss.inner.passage_extras


def test_matryoshka_config_errors_name_the_key_and_line(tmp_path):
    from peg.config import ConfigError, load_config

    base = "name: demo\nmodel:\n  name_or_path: m\nloss:\n  kind: infonce\n"
    path = tmp_path / "run.yaml"
    path.write_text(base + "  matryoshka_dims: [64, 32]\n  matryoshka_weights: [1.0]\n")
    with pytest.raises(ConfigError, match=r"run.yaml:7: loss.matryoshka_weights has 1 entries but loss.matryoshka_dims has 2"):
        load_config(path)
    path.write_text(base + "  matryoshka_dims: [64, 64]\n")
    with pytest.raises(ConfigError, match=r"run.yaml:6: loss.matryoshka_dims must be distinct"):
        load_config(path)
    path.write_text(base + "  matryoshka_dims: [64, 32]\n")
    assert load_config(path).loss.matryoshka_dims == [64, 32]
