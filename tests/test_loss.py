"""maskco.loss: batched InfoNCE logits against a loop written from the paper (docs/DESIGN.md 4.6)."""
import math

import pytest
import torch

from maskco.loss import (KeyQueue, contrastive_logits, contrastive_loss, info_nce, negative_index,
                         positive_accuracy)


def loop_loss(q, k, valid, temperature, intra=False, other_positives=False, queue=None):
    """The paper's pseudo-code, one query at a time: its logits list, then cross-entropy."""
    n, groups, _ = k.shape
    losses = []
    for i in range(n):
        if not valid[i]:
            continue
        row = [q[i] @ k[i, 0]]
        for j in range(n):
            for box in range(groups):
                if box == 0:
                    use = other_positives and j != i  # another image's positive
                else:
                    use = j != i or intra  # another image's negative box, or (+in) this image's own
                if use:
                    row.append(q[i] @ k[j, box])
        if queue is not None:
            row += [q[i] @ negative for negative in queue]
        logits = torch.stack(row) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def pair_loss(q, k, valid, temperature, intra=False, other_positives=False, extra_negatives=None):
    """The step's path (method.step_logits, then loss_from_inputs): contrastive_logits, then info_nce."""
    return info_nce(contrastive_logits(q, k, valid, temperature, intra, other_positives, extra_negatives), valid)


def unit(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


VARIANTS = {  # name: (M, intra, other_positives, queue size)
    "maskco": (3, False, False, 0),
    "maskco+in": (3, True, False, 0),
    "other_positives": (3, False, True, 0),
    "mocov2": (0, False, True, 0),
    "maskco+in+queue": (2, True, True, 7),
    "mocov2+queue": (0, False, True, 5),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_paper_loop_forward_and_backward(name):
    m, intra, other_positives, queue_size = VARIANTS[name]
    n, c = 5, 8
    valid = torch.tensor([True, True, False, True, True])
    q_a = unit(n, c, seed=1).requires_grad_()
    k_a = unit(n, 1 + m, c, seed=2).requires_grad_()
    queue = unit(queue_size, c, seed=3) if queue_size else None
    q_b, k_b = q_a.detach().clone().requires_grad_(), k_a.detach().clone().requires_grad_()
    fast = pair_loss(q_a, k_a, valid, 0.2, intra, other_positives, extra_negatives=queue)
    slow = loop_loss(q_b, k_b, valid, 0.2, intra, other_positives, queue)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(q_a.grad, q_b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_a.grad, k_b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_contrastive_loss_is_contrastive_logits_then_info_nce(name):
    """The convenience wrapper computes what the step computes: the same value and gradients."""
    m, intra, other_positives, queue_size = VARIANTS[name]
    valid = torch.tensor([True, False, True, True])
    q_a, k = unit(4, 8, seed=1).requires_grad_(), unit(4, 1 + m, 8, seed=2)
    queue = unit(queue_size, 8, seed=3) if queue_size else None
    q_b = q_a.detach().clone().requires_grad_()
    wrapped = contrastive_loss(q_a, k, valid, 0.2, intra, other_positives, extra_negatives=queue)
    pure = info_nce(contrastive_logits(q_b, k, valid, 0.2, intra, other_positives, extra_negatives=queue), valid)
    assert torch.equal(wrapped, pure)
    wrapped.backward()
    pure.backward()
    assert torch.equal(q_a.grad, q_b.grad)


def test_hand_worked_two_image_example():
    """2-D unit vectors, M = 1, t = 1: each logit is a dot product we can read off."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[[0.6, 0.8], [0.0, 1.0]],  # image 0: positive, negative
                      [[0.0, 1.0], [0.8, 0.6]]])  # image 1: positive, negative
    valid = torch.tensor([True, True])
    # Query 0: positive 0.6, image 1's negative 0.8.  Query 1: positive 1, image 0's negative 1.
    expected = ((math.log(math.exp(0.6) + math.exp(0.8)) - 0.6) + math.log(2.0)) / 2
    assert pair_loss(q, k, valid, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # (+in) adds each image's own negative: 0 for query 0, 0.6 for query 1.
    expected_in = ((math.log(math.exp(0.6) + math.exp(0.8) + 1.0) - 0.6)
                   + (math.log(2 * math.e + math.exp(0.6)) - 1.0)) / 2
    assert pair_loss(q, k, valid, 1.0, intra=True).item() == pytest.approx(expected_in, abs=1e-6)
    logits = contrastive_logits(q, k, valid, 0.5)  # [2, 2]
    torch.testing.assert_close(logits, torch.tensor([[1.2, 1.6], [2.0, 2.0]]))


def test_negative_index_picks_the_paper_negatives():
    n, m = 4, 3
    index = negative_index(n, m)  # [N, (N - 1) * M]
    assert index.shape == (n, (n - 1) * m) and index.dtype == torch.int64
    image, box = index // (1 + m), index % (1 + m)  # [N, K] each
    assert (image != torch.arange(n)[:, None]).all() and (box >= 1).all()
    assert negative_index(n, m, intra=True).shape == (n, n * m)
    assert negative_index(n, m, intra=True, other_positives=True).shape == (n, n * m + n - 1)
    assert negative_index(n, 0, other_positives=True).shape == (n, n - 1)
    assert negative_index(n, m) is not negative_index(n, m, intra=True)


def test_invalid_query_changes_nothing():
    n, m, c = 4, 2, 6
    valid = torch.tensor([True, False, True, True])
    q, k = unit(n, c, seed=4), unit(n, 1 + m, c, seed=5)
    base = pair_loss(q, k, valid, 0.2)
    poisoned = q.clone()
    poisoned[1] = float("nan")  # whatever an invalid query holds
    poisoned.requires_grad_()
    k.requires_grad_()
    loss = pair_loss(poisoned, k, valid, 0.2)
    torch.testing.assert_close(loss, base)
    loss.backward()
    assert torch.equal(poisoned.grad[1], torch.zeros(c))
    assert torch.isfinite(k.grad).all()


def test_no_valid_query_gives_zero_with_a_graph():
    q, k = unit(3, 4, seed=6).requires_grad_(), unit(3, 3, 4, seed=7).requires_grad_()
    loss = pair_loss(q, k, torch.zeros(3, dtype=torch.bool), 0.2)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))


def test_fp32_under_bfloat16_autocast():
    q, k = unit(4, 16, seed=8), unit(4, 5, 16, seed=9)
    valid = torch.ones(4, dtype=torch.bool)
    plain = pair_loss(q, k, valid, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = contrastive_logits(q.bfloat16(), k.bfloat16(), valid, 0.2)
        autocast = pair_loss(q, k, valid, 0.2)
    assert logits.dtype == torch.float32 and autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, atol=0, rtol=0)


def test_positive_accuracy_counts_valid_rows():
    logits = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 0.0]])
    valid = torch.tensor([True, True, False])
    assert positive_accuracy(logits, valid).item() == pytest.approx(0.5)
    assert info_nce(logits, valid).item() == pytest.approx(
        (math.log(math.exp(3) + math.e) - 3 + math.log(1 + math.exp(2))) / 2, abs=1e-6)


@pytest.mark.parametrize("args, name", [
    ((unit(1, 4), unit(1, 3, 4)), "negatives"),  # one image, no intra: nothing to contrast with
    ((unit(3, 4), unit(3, 1, 4)), "negatives"),  # M = 0 without other positives
    ((unit(3, 4, 1), unit(3, 3, 4)), "q"),
    ((unit(3, 4), unit(2, 3, 4)), "k"),
])
def test_bad_input_raises_value_error(args, name):
    with pytest.raises(ValueError, match=name):
        contrastive_logits(*args, torch.ones(args[0].shape[0], dtype=torch.bool), 0.2)


def test_bad_valid_and_temperature_raise():
    q, k = unit(3, 4), unit(3, 3, 4)
    with pytest.raises(ValueError, match="valid"):
        contrastive_logits(q, k, torch.ones(3), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_logits(q, k, torch.ones(3, dtype=torch.bool), 0.0)


def test_key_queue_is_a_ring_buffer():
    queue = KeyQueue(size=5, dim=2, generator=torch.Generator().manual_seed(0))
    expected, expected_ptr = queue.negatives().clone(), 0  # [5, 2]: a row-by-row reference
    for step, batch in enumerate([3, 3, 4, 7]):  # wraps, then a batch larger than the queue
        keys = torch.arange(batch * 2, dtype=torch.float32).reshape(batch, 2) + 100 * step  # [B, 2]
        for row in keys:
            expected[expected_ptr] = row
            expected_ptr = (expected_ptr + 1) % 5
        queue.enqueue(keys)
        assert torch.equal(queue.negatives(), expected), step
        assert queue.ptr == expected_ptr and isinstance(queue.ptr, int)


def test_key_queue_graph_survives_enqueue_and_state_round_trips():
    queue = KeyQueue(size=4, dim=3)
    q = unit(2, 3, seed=10).requires_grad_()
    loss = pair_loss(q, unit(2, 2, 3, seed=11), torch.ones(2, dtype=torch.bool), 0.2,
                     extra_negatives=queue.negatives())
    queue.enqueue(unit(2, 3, seed=12))  # before backward, as in a training step
    loss.backward()  # would fail if the queue had been written in place
    restored = KeyQueue(size=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.negatives(), queue.negatives()) and restored.ptr == queue.ptr == 2
    with pytest.raises(ValueError, match="buffer"):
        KeyQueue(size=3, dim=3).load_state_dict(queue.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_paper_loop_on_cuda():
    valid = torch.tensor([True, False, True, True], device="cuda")
    q, k, queue = unit(4, 8, seed=13).cuda(), unit(4, 4, 8, seed=14).cuda(), unit(6, 8, seed=15).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = pair_loss(q, k, valid, 0.2, intra=True, other_positives=True, extra_negatives=queue)
    slow = loop_loss(q, k, valid, 0.2, intra=True, other_positives=True, queue=queue)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_mocov2_step_logits_are_moco_queue_only_formulation():
    """``method: mocov2`` = moco/builder.py: l_pos = q.k+, l_neg = q.queue (the queue alone), / T, CE at 0."""
    from maskco.config import build_config
    from maskco.method import MethodSpec, step_logits

    cfg = build_config(["--method=mocov2", "--queue_size=64", "--head_dim=16"])
    spec = MethodSpec.from_config(cfg)
    generator = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1).requires_grad_()  # [N, C]
    k = torch.nn.functional.normalize(torch.randn(8, 1, 16, generator=generator), dim=2)  # [N, 1, C]: global keys
    queue = KeyQueue(64, 16, generator=generator)
    valid = torch.ones(8, dtype=torch.bool)
    logits = step_logits(q, k, valid, spec, queue.negatives())  # [N, 1 + 64]
    # MoCo's forward, written from moco/builder.py (queue stored as [K, C] here, [C, K] there)
    l_pos = torch.einsum("nc,nc->n", q, k[:, 0]).unsqueeze(-1)  # [N, 1]
    l_neg = torch.einsum("nc,kc->nk", q, queue.buffer)  # [N, K]
    reference = torch.cat([l_pos, l_neg], dim=1) / 0.2  # [N, 1 + K]
    torch.testing.assert_close(logits, reference)
    ours = info_nce(logits, valid)
    theirs = torch.nn.functional.cross_entropy(reference, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(ours, theirs)
    grad_ours, = torch.autograd.grad(ours, q)
    grad_theirs, = torch.autograd.grad(theirs, q)
    torch.testing.assert_close(grad_ours, grad_theirs)


def test_positive_accuracy_counts_ties_and_nan_as_misses():
    valid = torch.ones(3, dtype=torch.bool)
    logits = torch.tensor([[1.0, 1.0, 0.0], [float("nan"), 0.0, 0.0], [float("nan")] * 3])
    assert positive_accuracy(logits, valid).item() == 0.0  # argmax would say 3 of 3
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert positive_accuracy(logits, valid).item() == pytest.approx(1 / 3)
