"""Tests for adaswitch.py: closed forms for the divergences, hand-computed switch steps for the tracker,
equivalences for the rollout (== HF generate, batched == row by row, kept logits == a fresh forward), the
masking of the loss, and the program end to end (every method, seeds, DDP, bad input, scores).
CPU only, tiny random GPT-2 models saved to tmp_path.

    python -m pytest -q test_adaswitch.py
"""
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import (AutoModelForCausalLM, AutoTokenizer, CohereConfig, CohereForCausalLM, Gemma2Config,
                          Gemma2ForCausalLM, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import adaswitch as A
from adaswitch import (METRICS, MODES, SwitchTracker, completion_logits, distill_loss, divergence,
                       rollout)

V = 48          # vocabulary of the student and the default teacher
N = 10          # new tokens per rollout
EOS, PAD = 2, 0  # config ids; tests that need an EOS to fire pick one from a reference completion
INF = math.inf


def tiny_gpt2(vocab: int, seed: int, n_embd: int = 32, n_layer: int = 2) -> GPT2LMHeadModel:
    """A random GPT-2; initializer_range 0.5 makes varied, confident next-token distributions."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        initializer_range=0.5, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def student():
    return tiny_gpt2(V, seed=0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_gpt2(V, seed=1, n_embd=64, n_layer=3)


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts of lengths 7, 4 and 2: input_ids [3, 7], attention_mask [3, 7]."""
    ids = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, length in enumerate([7, 4, 2]):
        mask[row, 7 - length:] = 1
    return ids * mask, mask


def run(student, teacher, prompts, mode, **kwargs):
    """A greedy rollout of N tokens, no EOS, unless kwargs say otherwise."""
    kwargs = {"max_new_tokens": N, "do_sample": False, "eos_token_id": None, "pad_token_id": PAD, **kwargs}
    return rollout(student, teacher, *prompts, mode, **kwargs)


@torch.no_grad()
def fresh_logits(model, ro):
    """A parallel forward over the rollout's sequences: the logits that predicted each completion token."""
    positions = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ro.sequences, attention_mask=ro.attention_mask, position_ids=positions).logits
    return completion_logits(logits, ro.completion_mask.shape[1])[..., :V]  # [B, N, V]


def eos_ending_first_row(completion):
    """(token, step): a token that first appears in row 0 at step >= 1 and never in the last row."""
    for step in range(1, completion.shape[1]):
        token = completion[0, step].item()
        if token not in completion[0, :step] and token not in completion[-1]:
            return token, step
    raise AssertionError("no usable EOS in the reference completion; change the fixture seeds")


def run_with_eos(student, teacher, prompts, mode, **kwargs):
    """A greedy rollout with EOS = pad = a token this mode writes in row 0 (so row 0 stops early) but never in
    the last row (so it runs all N steps). Returns (eos, rollout)."""
    reference = run(student, teacher, prompts, mode, **kwargs).sequences[:, prompts[0].shape[1]:]
    eos, _ = eos_ending_first_row(reference)
    return eos, run(student, teacher, prompts, mode, eos_token_id=eos, pad_token_id=eos, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Divergences


def probs_logits(*rows):
    """Logits whose softmax is exactly the given probability rows (log 0 = -inf)."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


@pytest.mark.parametrize("metric", METRICS)
def test_divergence_zero_for_equal_logits(metric):
    """d(p || p) = 0 for every metric."""
    logits = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(divergence(logits, logits.clone(), metric), torch.zeros(4, 5), atol=1e-6)


def test_kl_matches_torch():
    """fkl = KL(p_t || p_s) and rkl = KL(p_s || p_t), as torch's F.kl_div computes them."""
    gen = torch.Generator().manual_seed(1)
    t, s = torch.randn(6, 13, generator=gen), torch.randn(6, 13, generator=gen)
    log_t, log_s = F.log_softmax(t, -1), F.log_softmax(s, -1)
    kl_ts = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    kl_st = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    assert not torch.allclose(kl_ts, kl_st, rtol=1e-2)  # the two directions really differ here
    assert torch.allclose(divergence(t, s, "fkl"), kl_ts, atol=1e-6)
    assert torch.allclose(divergence(t, s, "rkl"), kl_st, atol=1e-6)


def test_jsd_and_tvd_closed_forms():
    """Hand-computed JSD (with m = beta p_t + (1 - beta) p_s) and TVD on two-token distributions."""
    t, s = probs_logits([0.5, 0.5]), probs_logits([0.9, 0.1])
    # beta = 0.5: m = [0.7, 0.3]
    jsd_half = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) \
        + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))
    # beta = 0.25: m = 0.25 * [0.5, 0.5] + 0.75 * [0.9, 0.1] = [0.8, 0.2]
    jsd_quarter = 0.25 * (0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)) \
        + 0.75 * (0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2))
    assert divergence(t, s, "jsd").item() == pytest.approx(jsd_half, rel=1e-5)
    assert divergence(t, s, "jsd", beta=0.25).item() == pytest.approx(jsd_quarter, rel=1e-5)
    assert divergence(t, s, "tvd").item() == pytest.approx(0.4, rel=1e-5)  # 0.5 * (0.4 + 0.4)
    # disjoint supports: JSD = log 2, TVD = 1
    t, s = probs_logits([1.0, 0.0]), probs_logits([0.0, 1.0])
    assert divergence(t, s, "jsd").item() == pytest.approx(math.log(2), rel=1e-5)
    assert divergence(t, s, "tvd").item() == pytest.approx(1.0, rel=1e-5)


def test_jsd_beta_endpoints():
    """JSD_beta / beta -> fkl as beta -> 0, JSD_beta / (1 - beta) -> rkl as beta -> 1; beta 0 or 1 is an error."""
    t, s = probs_logits([0.9, 0.05, 0.05]), probs_logits([0.3, 0.3, 0.4])
    fkl, rkl = divergence(t, s, "fkl").item(), divergence(t, s, "rkl").item()
    assert abs(fkl - rkl) > 0.1 * fkl
    eps = 1e-3
    assert divergence(t, s, "jsd", beta=eps).item() / eps == pytest.approx(fkl, rel=5e-3)
    assert divergence(t, s, "jsd", beta=1 - eps).item() / eps == pytest.approx(rkl, rel=5e-3)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="fkl or rkl"):
            divergence(t, s, "jsd", beta=beta)


@pytest.mark.parametrize("metric", METRICS)
def test_shared_minus_inf_logits_give_finite_values_and_gradients(metric):
    """An id masked to -inf in both models adds nothing: finite value, finite gradients for both inputs."""
    t = torch.tensor([[0.0, 1.0, -INF], [0.5, -INF, 2.0]], requires_grad=True)
    s = torch.tensor([[2.0, 0.0, -INF], [0.1, -INF, -1.0]], requires_grad=True)
    d = divergence(t, s, metric)
    finite_t, finite_s = t.detach()[t.isfinite()].view(2, 2), s.detach()[s.isfinite()].view(2, 2)
    assert torch.allclose(d, divergence(finite_t, finite_s, metric), atol=1e-6)  # same as dropping the id
    d.sum().backward()
    assert t.grad.isfinite().all() and s.grad.isfinite().all()


def test_bf16_logits_give_non_negative_jsd():
    """bf16 inputs are computed in float32: near-equal distributions give JSD >= 0 (bf16 math gives ~ -1e-2)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 50, generator=gen) * 3
    t, s = x.bfloat16(), (x + 0.01 * torch.randn(500, 50, generator=gen)).bfloat16()
    d = divergence(t, s, "jsd")
    assert d.dtype == torch.float32
    assert (d >= -1e-6).all()


def test_divergence_rejects_bad_metric_and_shapes():
    """Unknown metric and teacher / student shapes that differ raise ValueError."""
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="metric"):
        divergence(x, x, "kl")
    with pytest.raises(ValueError, match="shape"):
        divergence(x, torch.zeros(2, 6))


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7)])
@pytest.mark.parametrize("metric", METRICS)
def test_divergence_reduces_the_last_dim(shape, metric):
    """[..., V] -> [...]."""
    assert divergence(torch.randn(shape), torch.randn(shape), metric).shape == shape[:-1]


def test_divergences_at_temperature_two():
    """Logits are divided by T before the softmax: at T = 2, logits 2 log p give back the distributions p."""
    t, s = 2 * probs_logits([0.5, 0.5]), 2 * probs_logits([0.9, 0.1])
    expected = {"fkl": 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1),
                "rkl": 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5),
                "tvd": 0.4,
                "jsd": 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
                + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))}
    for metric, value in expected.items():
        assert divergence(t, s, metric, temperature=2.0).item() == pytest.approx(value, rel=1e-5), metric
        assert divergence(t, s, metric).item() != pytest.approx(value, rel=1e-2), metric  # T = 1 is another value
    s3, t3, mask = loss_inputs()
    d = divergence(t3, s3, "fkl", temperature=2.0)
    assert torch.allclose(distill_loss(s3, t3, mask, "fkl", temperature=2.0), d[mask.bool()].mean())


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, INF])
def test_divergence_rejects_temperatures_that_cannot_divide_logits(temperature):
    """T <= 0 or non-finite raises ValueError (instead of inf / nan divergences)."""
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        divergence(x, x + 1, "fkl", temperature=temperature)


# ----------------------------------------------------------------------------------------------------
# Switch tracker


def feed(tracker, rows, active=None):
    """Feed per-step divergences rows [B, T] (and active [B, T]); return the fired flags [B, T]."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    fired = []
    for i in range(rows.shape[1]):
        fired.append(tracker.update(rows[:, i], None if active is None else torch.as_tensor(active)[:, i]))
    return torch.stack(fired, dim=1)


# (window, k, divergences, switch step): tau_i = k * mean of the last `window` d's before step i
SWITCH_CASES = [
    (3, 2.0, [1, 1, 1, 2.5], 3),             # tau = 2 from (1, 1, 1); with 2.5 in the mean tau would be 3
    (3, 2.0, [1, 1, 1, 2.0], -1),            # d must exceed tau strictly
    (3, 2.0, [1, 2, 3, 3.9, 7], 4),          # step 3: tau = 4 > 3.9; step 4: tau = 2 * (2 + 3 + 3.9) / 3 = 5.93
    (3, 2.0, [100, 1, 1, 1, 2.5], 4),        # the ring buffer wraps: 100 has left the window at step 4
    (2, 3.0, [9, 1, 3, 2.9, 9], 4),          # step 4: tau = 3 * (3 + 2.9) / 2 = 8.85 (the full mean would give 11.9)
    (1, 1.5, [2, 2.9, 4.4, 6.7], 2),         # window 1: tau = 1.5 * previous d
    (4, 1.0, [1, 1, 1, 1, 1, 1, 1.01], 6),
]


@pytest.mark.parametrize("window,k,ds,step", SWITCH_CASES)
def test_tracker_hand_computed_switch_steps(window, k, ds, step):
    """The row switches exactly at the hand-computed step, and update reports it at that step only."""
    tracker = SwitchTracker(1, window, k)
    fired = feed(tracker, [ds])
    assert fired.dtype == torch.bool
    assert tracker.switch_step.tolist() == [step]
    assert tracker.switched.tolist() == [step >= 0]
    assert fired[0].nonzero().flatten().tolist() == ([step] if step >= 0 else [])


def test_tracker_waits_for_a_full_window():
    """A huge spike before `window` divergences are recorded does not switch (and then dominates the mean)."""
    tracker = SwitchTracker(1, window=3, k=1.0)
    assert not feed(tracker, [[1, 1, 1000, 1]]).any()
    assert tracker.switch_step.item() == -1


def test_tracker_switches_once():
    """After the switch, later spikes are ignored and switch_step stays."""
    tracker = SwitchTracker(1, window=3, k=2.0)
    fired = feed(tracker, [[1, 1, 1, 5, 100, 1000]])
    assert fired[0].tolist() == [False, False, False, True, False, False]
    assert tracker.switch_step.item() == 3 and tracker.switched.item()


def test_tracker_inactive_steps_are_skipped():
    """An inactive row neither switches nor records: it behaves as if those steps never happened."""
    tracker = SwitchTracker(2, window=3, k=2.0)
    ds = [[1, 1, 1, 1, 5, 1, 1],
          [1, 1, 1, 1e6, 1e6, 1, 5]]  # row 1 sees (1, 1, 1, 1, 5) on its active steps, like row 0
    active = [[True] * 7,
              [True, True, True, False, False, True, True]]
    fired = feed(tracker, ds, active)
    assert tracker.switch_step.tolist() == [4, 6]
    assert fired.tolist() == [[False] * 4 + [True, False, False], [False] * 6 + [True]]


def test_tracker_k_inf_never_switches():
    """k = inf: no switch, also with an all-zero history."""
    tracker = SwitchTracker(2, window=2, k=INF)
    assert not feed(tracker, [[1, 1, 1e30, 1e38], [0, 0, 0, 5]]).any()
    assert tracker.switch_step.tolist() == [-1, -1]


@pytest.mark.parametrize("kwargs", [dict(window=0, k=1.0), dict(window=-1, k=1.0), dict(window=2, k=-0.5),
                                    dict(window=2, k=math.nan), dict(window=2, k=1.0, min_history=0),
                                    dict(window=2, k=1.0, min_history=3)])
def test_tracker_rejects_bad_arguments(kwargs):
    """window < 1, k < 0 (or nan) and min_history outside [1, window] raise ValueError."""
    with pytest.raises(ValueError):
        SwitchTracker(1, **kwargs)


def test_tracker_min_history_uses_the_mean_of_what_exists():
    """min_history < window lets a row switch early, against the mean of the divergences recorded so far."""
    ds = [[1, 3, 3.9, 5.5]]
    # step 2: tau = 2 * mean(1, 3) = 4 > 3.9 (a zero-padded window mean would give 2 and switch here);
    # step 3: tau = 2 * mean(1, 3, 3.9) = 5.27 < 5.5
    early = SwitchTracker(1, window=4, k=2.0, min_history=2)
    feed(early, ds)
    assert early.switch_step.item() == 3
    default = SwitchTracker(1, window=4, k=2.0)  # needs 4 recorded divergences: none left to switch on
    feed(default, ds)
    assert default.switch_step.item() == -1


def test_tracker_batched_equals_rows():
    """All hand-made cases with the same (window, k) fed as one batch give each row's own switch step."""
    for window, k in {(w, k) for w, k, _, _ in SWITCH_CASES}:
        cases = [(ds, step) for w, kk, ds, step in SWITCH_CASES if (w, kk) == (window, k)]
        length = max(len(ds) for ds, _ in cases)
        ds = [ds + [1e6] * (length - len(ds)) for ds, _ in cases]  # padded steps are inactive
        active = [[i < len(c) for i in range(length)] for c, _ in cases]
        tracker = SwitchTracker(len(cases), window, k)
        feed(tracker, ds, active)
        assert tracker.switch_step.tolist() == [step for _, step in cases]


# ----------------------------------------------------------------------------------------------------
# Rollout


@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_greedy_rollout_equals_generate(student, teacher, prompts, mode):
    """Greedy student / teacher mode == HF generate on a left-padded batch, EOS and padding included."""
    model = student if mode == "student" else teacher
    reference = model.generate(input_ids=prompts[0], attention_mask=prompts[1], do_sample=False,
                               max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
    ro = run(student, teacher, prompts, mode, eos_token_id=EOS)
    assert torch.equal(ro.sequences, reference)
    assert torch.equal(ro.from_teacher, ro.completion_mask.bool() & (mode == "teacher"))
    assert ro.switch_step.tolist() == [0 if mode == "teacher" else -1] * 3


def test_adaswitch_with_k_inf_is_student(student, teacher, prompts):
    """k = inf never switches: the student writes everything."""
    ro = run(student, teacher, prompts, "adaswitch", window=2, k=INF)
    assert torch.equal(ro.sequences, run(student, teacher, prompts, "student").sequences)
    assert not ro.from_teacher.any()
    assert ro.switch_step.tolist() == [-1, -1, -1]


def test_eos_is_kept_and_rows_stop_independently(student, teacher, prompts):
    """With pad = eos (GPT-2 style) the EOS is inside completion_mask, then pad, masked; each row stops on its own."""
    P = prompts[0].shape[1]
    reference = run(student, teacher, prompts, "student").sequences[:, P:]
    eos, stop = eos_ending_first_row(reference)
    ro = run(student, teacher, prompts, "student", eos_token_id=eos, pad_token_id=eos)
    lengths = ro.completion_mask.sum(-1)
    assert lengths[0] == stop + 1 and lengths[-1] == N  # rows stop at different steps
    for row, length in enumerate(lengths.tolist()):
        assert ro.completion_mask[row].tolist() == [1] * length + [0] * (N - length)
        assert torch.equal(ro.sequences[row, P:P + length], reference[row, :length])
        assert (ro.sequences[row, P + length:] == eos).all()
        assert length == N or ro.sequences[row, P + length - 1] == eos
    assert torch.equal(ro.attention_mask, torch.cat([prompts[1], ro.completion_mask], dim=1))
    generated = student.generate(input_ids=prompts[0], attention_mask=prompts[1], do_sample=False,
                                 max_new_tokens=N, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(ro.sequences, generated)


def test_k_zero_switches_at_window_then_teacher_continues(student, teacher, prompts):
    """k = 0: every row switches at step `window`, and from there the completion is the teacher's greedy one."""
    window, P = 3, prompts[0].shape[1]
    ro = run(student, teacher, prompts, "adaswitch", window=window, k=0.0, eos_token_id=EOS)
    assert ro.completion_mask.all()
    assert ro.switch_step.tolist() == [window] * 3
    assert not ro.from_teacher[:, :window].any() and ro.from_teacher[:, window:].all()
    own = run(student, teacher, prompts, "student", eos_token_id=EOS).sequences
    assert torch.equal(ro.sequences[:, :P + window], own[:, :P + window])
    continued = teacher.generate(input_ids=ro.sequences[:, :P + window], attention_mask=ro.attention_mask[:, :P + window],
                                 do_sample=False, max_new_tokens=N - window, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ro.sequences, continued)


@pytest.mark.parametrize("teacher_writes_switch_token", [True, False])
def test_from_teacher_agrees_with_switch_step_and_models(student, teacher, prompts, teacher_writes_switch_token):
    """switch_step is the first teacher token in both settings, from_teacher is 1 from there on, and each token is its
    writer's greedy choice; the rule fired at switch_step, or one step before when the student writes that token."""
    ro = run(student, teacher, prompts, "adaswitch", window=2, k=1.5,
             teacher_writes_switch_token=teacher_writes_switch_token)
    steps = ro.switch_step.tolist()
    assert any(2 < s < N - 1 for s in steps)  # some row switches in the middle: the check has teeth
    expected = (torch.arange(N) >= ro.switch_step[:, None]) & (ro.switch_step[:, None] >= 0)
    assert torch.equal(ro.from_teacher, expected)
    completion = ro.sequences[:, -N:]
    by_teacher, by_student = fresh_logits(teacher, ro).argmax(-1), fresh_logits(student, ro).argmax(-1)
    assert torch.equal(completion, torch.where(ro.from_teacher, by_teacher, by_student))
    # the tracker replayed on the recorded divergences gives the same switch steps
    tracker = SwitchTracker(3, window=2, k=1.5)
    feed(tracker, ro.divergences, ro.completion_mask.bool())
    fired = [s - (not teacher_writes_switch_token) if s >= 0 else -1 for s in steps]
    assert tracker.switch_step.tolist() == fired


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_rows(student, teacher, prompts, mode):
    """A batched greedy rollout (with an EOS that stops row 0 early) equals each row run alone."""
    P, kwargs = prompts[0].shape[1], dict(window=2, k=1.5, skd_top_k=5)
    eos, batch = run_with_eos(student, teacher, prompts, mode, **kwargs)
    assert not batch.completion_mask.all()
    kwargs.update(eos_token_id=eos, pad_token_id=eos)
    for row in range(3):
        length = prompts[1][row].sum().item()
        alone = run(student, teacher, (prompts[0][row:row + 1, P - length:], prompts[1][row:row + 1, P - length:]),
                    mode, **kwargs)
        n = alone.completion_mask.shape[1]
        assert alone.completion_mask.all()  # the rollout ends once every row has written EOS
        assert torch.equal(batch.completion_mask[row, :n], alone.completion_mask[0])
        assert not batch.completion_mask[row, n:].any()
        assert torch.equal(batch.sequences[row, P:P + n], alone.sequences[0, length:])
        assert torch.equal(batch.from_teacher[row, :n], alone.from_teacher[0])
        assert batch.switch_step[row] == alone.switch_step[0]


def test_skd_tokens_lie_in_teacher_top_k(student, teacher, prompts):
    """SKD: every token is in the teacher's top-k at its step; from_teacher marks the student tokens replaced;
    with skd_top_k = V no token is replaced."""
    top_k = 5
    ro = run(student, teacher, prompts, "skd", skd_top_k=top_k)
    top = fresh_logits(teacher, ro).topk(top_k, dim=-1).indices                       # [B, N, k]
    completion = ro.sequences[:, -N:]
    assert (top == completion[..., None]).any(-1).all()
    student_choice = fresh_logits(student, ro).argmax(-1)                             # [B, N]
    rejected = ~(top == student_choice[..., None]).any(-1)
    assert rejected.any() and not rejected.all()
    assert torch.equal(ro.from_teacher, rejected)
    assert ro.switch_step.tolist() == [r.tolist().index(True) if r.any() else -1 for r in rejected]  # first replacement
    assert torch.equal(completion[~rejected], student_choice[~rejected])
    ro = run(student, teacher, prompts, "skd", skd_top_k=V)
    assert torch.equal(ro.sequences, run(student, teacher, prompts, "student").sequences)
    assert not ro.from_teacher.any()


@pytest.mark.parametrize("mode", ["student", "adaswitch"])
def test_sampling_follows_the_generator(student, teacher, prompts, mode):
    """The same generator seed gives the same samples, another seed different ones."""
    def sampled(seed):
        return run(student, teacher, prompts, mode, do_sample=True, window=2, k=1.5,
                   generator=torch.Generator().manual_seed(seed)).sequences
    assert torch.equal(sampled(0), sampled(0))
    assert not torch.equal(sampled(0), sampled(1))


@pytest.mark.parametrize("mode", MODES)
def test_teacher_hidden_states_give_the_logits_of_a_fresh_forward(student, teacher, prompts, mode):
    """The teacher's hidden states kept by the rollout, through lm_head == a parallel teacher forward's logits, on
    completion tokens; None for student."""
    _, ro = run_with_eos(student, teacher, prompts, mode, window=2, k=1.5, skd_top_k=5)
    if mode == "student":
        assert ro.teacher_hidden is None
        return
    assert ro.teacher_hidden.shape == (3, ro.completion_mask.shape[1], teacher.config.n_embd)
    keep = ro.completion_mask.bool()
    assert not keep.all()
    # cached vs parallel float32 attention differ by up to ~2e-4 on these logits (|x| < 16); in float64, 1e-13
    with torch.no_grad():
        assert torch.allclose(A.lm_head(teacher, ro.teacher_hidden)[keep], fresh_logits(teacher, ro)[keep], atol=1e-3)


@pytest.mark.parametrize("mode,metric,k,beta", [("skd", "fkl", 1.5, 0.5), ("adaswitch", "fkl", 1.5, 0.5),
                                                ("adaswitch", "rkl", 1.5, 0.5), ("adaswitch", "jsd", 1.1, 0.5),
                                                ("adaswitch", "jsd", 1.1, 0.1), ("adaswitch", "tvd", 1.1, 0.5),
                                                ("teacher", "fkl", 1.5, 0.5), ("student", "fkl", 1.5, 0.5)])
def test_divergences_where_both_models_ran(student, teacher, prompts, mode, metric, k, beta):
    """divergences is nonzero exactly where both models ran (adaswitch: up to and including the switch step,
    unfinished rows only) and there equals divergence() of fresh teacher and student logits, switch_beta included."""
    _, ro = run_with_eos(student, teacher, prompts, mode, window=2, k=k, skd_top_k=5, switch_metric=metric,
                         switch_beta=beta)
    keep = ro.completion_mask.bool()
    steps = torch.arange(keep.shape[1])
    if mode in ("student", "teacher"):
        both = torch.zeros_like(keep)
    elif mode == "skd":
        both = keep
    else:
        both = keep & ((ro.switch_step[:, None] < 0) | (steps <= ro.switch_step[:, None]))
        assert (ro.switch_step >= 0).any() and not both[keep].all()
    assert torch.equal(ro.measured, both)
    assert torch.equal(ro.divergences != 0, both)
    fresh = divergence(fresh_logits(teacher, ro), fresh_logits(student, ro), metric, beta)
    assert torch.allclose(ro.divergences[both], fresh[both], rtol=1e-3, atol=1e-4)


def test_rollout_restores_train_mode(student, teacher, prompts):
    """Models run in eval mode and go back to the train / eval mode they had."""
    student.train()
    try:
        ro = run(student, teacher, prompts, "adaswitch", window=2, k=1.5)
        assert student.training and not teacher.training
    finally:
        student.eval()
    # dropout was off during the rollout: same result as with the student in eval mode
    assert torch.equal(ro.sequences, run(student, teacher, prompts, "adaswitch", window=2, k=1.5).sequences)


@pytest.mark.parametrize("mode", ["skd", "adaswitch"])
def test_wider_teacher_vocab(student, prompts, mode):
    """A teacher with a padded, larger vocabulary: sampled ids stay below min(V), logits are cut to V."""
    wide = tiny_gpt2(V + 16, seed=1)
    with torch.no_grad():
        wide.transformer.wte.weight[V:] *= 10  # make the padded ids the teacher's favourites
    own = run(None, wide, prompts, "teacher", do_sample=True, generator=torch.Generator().manual_seed(0))
    assert (own.sequences >= V).any()  # on its own vocabulary the teacher writes padded ids
    beside = run(student, wide, prompts, "teacher", do_sample=True, generator=torch.Generator().manual_seed(0))
    assert (beside.sequences < V).all()  # beside a student (off-policy KD) only ids the student can read
    ro = run(student, wide, prompts, mode, do_sample=True, window=2, k=0.0, skd_top_k=5,
             generator=torch.Generator().manual_seed(0))
    assert ro.from_teacher.any()
    assert (ro.sequences < V).all()
    with torch.no_grad():  # the loss compares the first V logits of each model
        expected = distill_loss(fresh_logits(student, ro), fresh_logits(wide, ro), ro.completion_mask)
        assert torch.allclose(A.sequence_loss(student, wide, ro), expected, atol=1e-4)


@pytest.mark.parametrize("broken", ["student", "teacher"])
def test_non_finite_logits_stop_the_rollout_naming_the_model_and_the_step(student, teacher, prompts, broken):
    """A model whose logits are NaN (diverged weights, an overflow) stops the rollout with a FloatingPointError that
    names it and the completion step, not a traceback from inside torch.multinomial; the head check of the teacher's
    first forward lets the NaN through to say so."""
    models = {"student": student, "teacher": teacher}
    models[broken] = copy.deepcopy(models[broken])
    with torch.no_grad():
        models[broken].lm_head.weight[5, 0] = math.nan  # tied to the input embedding: id 5's logit is NaN everywhere
    with pytest.raises(FloatingPointError, match=f"^the {broken}'s logits are NaN or inf at completion step 0$"):
        run(models["student"], models["teacher"], prompts, "adaswitch", do_sample=True)


def test_rollout_rejects_bad_mode(student, teacher, prompts):
    """An unknown mode raises ValueError."""
    with pytest.raises(ValueError, match="mode"):
        run(student, teacher, prompts, "gkd")


def test_sampling_at_temperature_half():
    """sample(logits, T=0.5) draws from softmax(logits / 0.5) with the given generator (not from softmax(logits))."""
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    drawn = A.sample(logits, 0.5, generator=torch.Generator().manual_seed(1))
    expected = torch.multinomial(F.softmax(logits / 0.5, -1), 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, expected.squeeze(-1))
    assert not torch.equal(drawn, A.sample(logits, 1.0, generator=torch.Generator().manual_seed(1)))


@torch.no_grad()
def test_sampled_rollout_at_temperature_half_equals_a_plain_loop(student, teacher, prompts):
    """A sampled student rollout at T = 0.5 == a loop of full forwards, softmax(logits / 0.5), multinomial with the
    same generator: the temperature reaches the rollout's sampling."""
    ro = run(student, teacher, prompts, "student", do_sample=True, temperature=0.5,
             generator=torch.Generator().manual_seed(0))
    ids, mask, gen = prompts[0], prompts[1], torch.Generator().manual_seed(0)
    for _ in range(N):
        logits = student(input_ids=ids, attention_mask=mask, position_ids=A.position_ids(mask)).logits[:, -1]
        token = torch.multinomial(F.softmax(logits / 0.5, -1), 1, generator=gen)        # [B, 1]
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(ro.sequences, ids)
    at_one = run(student, teacher, prompts, "student", do_sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(ro.sequences, at_one.sequences)


# Rotary, grouped-query and sliding-window families: (model class, config class, extra config).
# The sliding-window configs use a window of 4 on sequences of up to 17 tokens, so the window matters.
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(initializer_range=0.5)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(initializer_range=0.5, use_sliding_window=True,
                                                  sliding_window=4, max_window_layers=0)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(initializer_range=0.5, sliding_window=4)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(initializer_range=0.02, sliding_window=4, head_dim=8)),
    "phi": (PhiForCausalLM, PhiConfig, dict(initializer_range=0.5)),  # its output layer has a bias
}


def tiny_family(family: str, seed: int = 0, **overrides):
    """A random 2-layer model of the family: 4 query heads sharing 2 key/value heads (grouped-query attention)."""
    model_class, config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    config = config_class(bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, **{**shape, **extra, **overrides})
    model = model_class(config).eval()
    if model.lm_head.bias is not None:  # initialized to 0: random, so that a head that drops it computes otherwise
        torch.nn.init.normal_(model.lm_head.bias.data)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_rollout_equals_generate_across_families(family, prompts):
    """Greedy student and teacher modes == HF generate on a left-padded batch (rotary positions skip the padding,
    grouped-query heads, sliding windows), EOS and padding included."""
    model = tiny_family(family)
    reference = model.generate(input_ids=prompts[0], attention_mask=prompts[1], do_sample=False,
                               max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
    assert len(set(reference[:, -N:].flatten().tolist())) > 3  # varied completions: the check has teeth
    for mode, pair in (("student", (model, None)), ("teacher", (None, model))):
        ro = run(*pair, prompts, mode, eos_token_id=EOS)
        assert torch.equal(ro.sequences, reference), mode
    if "sliding_window" in FAMILIES[family][2]:  # the window changes this model's completions
        wide = tiny_family(family, sliding_window=64)
        assert not torch.equal(wide.generate(input_ids=prompts[0], attention_mask=prompts[1], do_sample=False,
                                             max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD), reference)


# ----------------------------------------------------------------------------------------------------
# Losses


def test_completion_logits_picks_the_predicting_positions():
    """completion_logits(logits, N) == logits[:, P-1:P+N-1], also from the last N+1 positions only."""
    P, n = 5, 3
    logits = torch.arange(2 * (P + n) * 4).view(2, P + n, 4)
    assert torch.equal(completion_logits(logits, n), logits[:, P - 1:P + n - 1])
    assert torch.equal(completion_logits(logits[:, -(n + 1):], n), logits[:, P - 1:P + n - 1])


def test_distill_loss_gradient_reaches_the_student_only(student, teacher, prompts):
    """Backward through distill_loss fills student gradients and leaves every teacher .grad None."""
    ro = run(student, teacher, prompts, "student")
    try:
        s = completion_logits(student(input_ids=ro.sequences, attention_mask=ro.attention_mask).logits, N)
        t = completion_logits(teacher(input_ids=ro.sequences, attention_mask=ro.attention_mask).logits, N)
        distill_loss(s, t, ro.completion_mask).backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in student.parameters())
        assert student.lm_head.weight.grad.abs().sum() > 0
    finally:
        student.zero_grad(set_to_none=True)
        teacher.zero_grad(set_to_none=True)


def loss_inputs(vocab_t=9):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 9, generator=gen) * 2
    t = torch.randn(2, 4, vocab_t, generator=gen) * 2
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    return s, t, mask


@pytest.mark.parametrize("metric", METRICS)
def test_distill_loss_is_the_masked_mean(metric):
    """loss = mean of divergence over mask positions; num_tokens replaces the divisor."""
    s, t, mask = loss_inputs()
    d = divergence(t, s, metric)
    assert torch.allclose(distill_loss(s, t, mask, metric), d[mask.bool()].mean())
    assert torch.allclose(distill_loss(s, t, mask, metric, num_tokens=7), d[mask.bool()].sum() / 7)


@pytest.mark.parametrize("garbage", [1e4, INF, -INF, math.nan])
@pytest.mark.parametrize("metric", METRICS)
def test_masked_positions_do_not_change_the_loss(metric, garbage):
    """Garbage (large, inf, nan) in masked positions leaves the loss as it was."""
    s, t, mask = loss_inputs()
    clean = distill_loss(s, t, mask, metric)
    s, t = s.clone(), t.clone()
    s[mask == 0], t[mask == 0] = garbage, -garbage
    assert torch.equal(distill_loss(s, t, mask, metric), clean)


def test_masked_positions_get_no_gradient():
    """With large finite garbage in masked positions, those get zero gradient and the others are unchanged."""
    s, t, mask = loss_inputs()
    clean = s.clone().requires_grad_(True)
    distill_loss(clean, t, mask, "jsd").backward()
    dirty = s.clone()
    dirty[mask == 0] = 1e4
    dirty.requires_grad_(True)
    t = t.clone()
    t[mask == 0] = -1e4
    distill_loss(dirty, t, mask, "jsd").backward()
    assert (dirty.grad[mask == 0] == 0).all()
    assert torch.allclose(dirty.grad[mask == 1], clean.grad[mask == 1])


def test_distill_loss_cuts_a_wider_teacher_vocab():
    """A teacher with extra (padded) ids is compared on the student's ids only."""
    s, t, mask = loss_inputs(vocab_t=12)
    assert torch.allclose(distill_loss(s, t, mask), distill_loss(s, t[..., :9], mask))


def test_sequence_loss_is_the_distill_loss_of_a_fresh_forward_or_the_nll(student, teacher, prompts):
    """sequence_loss == distill_loss of fresh parallel logits (kept teacher logits or not); teacher None: the NLL."""
    ro = run(student, teacher, prompts, "adaswitch", window=2, k=1.5)
    with torch.no_grad():
        s, t = (completion_logits(m(input_ids=ro.sequences, attention_mask=ro.attention_mask,
                                    position_ids=A.position_ids(ro.attention_mask)).logits, N) for m in (student, teacher))
        for kept in (ro.teacher_hidden, None):  # atol 1e-4 on a mean divergence: kept states differ from a fresh
            # forward's by float rounding that depends on the CPU's kernels (bounded above); the chunking's exactness
            # is test_chunked_loss_and_gradient_equal_the_full_logits_ones, like with like
            seq = A.Rollout(**{**vars(ro), "teacher_hidden": kept})
            assert torch.allclose(A.sequence_loss(student, teacher, seq, "rkl"), distill_loss(s, t, ro.completion_mask, "rkl"),
                                  atol=1e-4)
        nll = F.cross_entropy(s.transpose(1, 2), ro.sequences[:, -N:], reduction="none")
        assert torch.allclose(A.sequence_loss(student, None, ro, num_tokens=7.0), nll.sum() / 7, atol=1e-4)


def full_logits_loss(student, teacher, seq, metric, temperature):
    """The loss as written before chunking, from whole [B, N, V] logits: distill_loss, or the NLL without a teacher."""
    n, mask = seq.completion_mask.shape[1], seq.completion_mask
    inputs = dict(input_ids=seq.sequences, attention_mask=seq.attention_mask, position_ids=A.position_ids(mask))
    inputs["position_ids"] = A.position_ids(seq.attention_mask)
    s = completion_logits(student(**inputs).logits, n)                                     # [B, N, V]
    if teacher is None:
        nll = F.cross_entropy(s.transpose(1, 2), seq.sequences[:, -n:], reduction="none")  # [B, N]
        return torch.where(mask.bool(), nll, 0.0).sum() / mask.sum()
    with torch.no_grad():  # the teacher states the chunked loss is given: kept ones == a fresh forward's only to float
        # rounding, which differs between CPUs' kernels (a test of its own checks that)
        t = completion_logits(teacher(**inputs).logits, n) if seq.teacher_hidden is None else \
            A.lm_head(teacher, seq.teacher_hidden)                                          # [B, N, V]
    return distill_loss(s, t, mask, metric, 0.3, temperature)


@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_chunked_loss_and_gradient_equal_the_full_logits_ones(family, prompts):
    """sequence_loss, a chunk of 3 tokens at a time (a chunk size that does not divide the token count), with the
    rollout's teacher hidden states or a teacher forward, == the loss of whole logits, and so do the student's
    gradients: every divergence, SFT, two temperatures; rows that end early (masked positions); a teacher wider than
    the student; Gemma 2's soft-capped logits; Phi's output layer with a bias."""
    cap = dict(final_logit_softcapping=2.0) if family == "gemma2" else {}  # 30 would barely touch these logits
    make = (lambda seed, width: tiny_gpt2(V, seed, n_embd=width)) if family == "gpt2" else \
        (lambda seed, width: tiny_family(family, seed, hidden_size=width, **cap))
    student, teacher = make(0, 32), make(1, 64)
    switch = dict(window=2, k=1.2)
    token, _ = eos_ending_first_row(run(student, teacher, prompts, "adaswitch", **switch).sequences[:, -N:])
    ro = run(student, teacher, prompts, "adaswitch", eos_token_id=token, **switch)
    keep = ro.completion_mask.bool()
    assert not keep.all() and keep.sum() % 3 != 0 and ro.teacher_hidden is not None
    for metric, temperature, kept in [(m, t, kept) for m in (*METRICS, "sft") for t in (1.0, 2.0)
                                      for kept in (True, False)]:
        scorer = None if metric == "sft" else teacher
        seq = A.Rollout(**{**vars(ro), "teacher_hidden": ro.teacher_hidden if kept else None})
        grads = []
        for loss in (lambda: A.sequence_loss(student, scorer, seq, metric if scorer else "fkl", 0.3, temperature,
                                             chunk_size=3),
                     lambda: full_logits_loss(student, scorer, seq, metric, temperature)):
            student.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            grads.append((value.detach(), [p.grad.clone() for p in student.parameters()]))
        (chunked, g_chunked), (full, g_full) = grads
        case = f"{metric} T={temperature} kept={kept}"
        assert torch.allclose(chunked, full, rtol=1e-4, atol=1e-5), case
        assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(g_chunked, g_full)), case
        assert any(g.abs().sum() > 0 for g in g_chunked) and all(p.grad is None for p in teacher.parameters())
        if metric == "sft":
            break  # SFT has no teacher and no temperature
    student.zero_grad(set_to_none=True)


def test_a_head_the_chunked_loss_cannot_reproduce_is_refused(student, prompts):
    """Cohere scales its logits after the output embedding (logit_scale): as a teacher of a rollout or as a student
    of the loss it is refused with a line, never used to compute a different loss."""
    torch.manual_seed(0)
    cohere = CohereForCausalLM(CohereConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5,
                                            pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)).eval()
    with pytest.raises(ValueError, match="CohereForCausalLM computes its logits otherwise"):
        run(student, cohere, prompts, "adaswitch")
    ro = run(student, None, prompts, "student")
    with pytest.raises(ValueError, match="CohereForCausalLM computes its logits otherwise"):
        A.sequence_loss(cohere, None, ro)
    reference = cohere.generate(input_ids=prompts[0], attention_mask=prompts[1], do_sample=False, max_new_tokens=N,
                                pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(run(cohere, None, prompts, "student").sequences, reference)  # decoding needs no head of ours


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest memory (elements of storage, so views count as what they view) held by a tensor whose last
    dimension is the vocabulary, over every operation, the backward pass too."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("method", ["sft", "supervised_kd", "on_policy", "adaswitch"])
def test_no_tensor_of_the_batchs_logits_is_ever_made_or_kept(method, monkeypatch):
    """One training step (rollout, loss, backward, update) makes no tensor of B x N x V or more: logits exist for a
    chunk of 64 tokens at a time, out of B x N = 96 here (the unchunked loss made [B, N, V], 96 x V). And when the
    loss returns, none of the logits autograd saved is still alive: chunks do not add up until the backward pass."""
    import weakref
    vocab, batch, new = 97, 4, 24
    student, teacher = tiny_gpt2(vocab, seed=0), tiny_gpt2(vocab, seed=1).requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for m in (student, teacher) for p in m.parameters()}
    saved, alive, loss_fn = [], [], A.sequence_loss

    def pack(t: torch.Tensor) -> torch.Tensor:  # the weights' [H, V] views are saved too, and are no logits
        if t.dim() and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
            saved.append(weakref.ref(t))
        return t

    def watched(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(*args, **kwargs)
        alive.append(sum(ref().numel() for ref in saved if ref() is not None))
        return loss
    monkeypatch.setattr(A, "sequence_loss", watched)
    gen = torch.Generator().manual_seed(0)
    examples = [{"prompt": torch.randint(3, vocab, (5,), generator=gen).tolist(),
                 "response": torch.randint(3, vocab, (new,), generator=gen).tolist(), "reference": ""}
                for _ in range(batch)]
    args = A.parse_args(["--method", method, "--max-steps", "1", "--batch-size", str(batch), "--max-new-tokens",
                         str(new), "--k", "1.2", "--window", "2"])
    with LargestVocabTensor(vocab) as watch:
        A.train(student, teacher, A.batch_stream(examples, batch, PAD, "cpu", seed=0), args, A.char_tokenizer(), [])
    assert 64 * vocab <= watch.largest < batch * new * vocab
    assert len(saved) > 2 and alive == [0]  # logits were saved, within a chunk, and freed with it


def test_statistics_count_measured_zero_divergences():
    """A divergence that was measured and is exactly 0 counts in the logged mean; an unmeasured one does not."""
    mask = torch.ones(1, 3, dtype=torch.long)
    seq = A.Rollout(sequences=torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 5), completion_mask=mask,
                    from_teacher=torch.tensor([[False, False, True]]), switch_step=torch.tensor([2]),
                    divergences=torch.tensor([[0.0, 3.0, 0.0]]), measured=torch.tensor([[True, True, False]]))
    stats = A.sequence_stats([seq])
    mean = {key: A.ratio(*pair) for key, pair in stats.items()}
    assert mean["divergence"] == 1.5 and mean["switch_pos"] == 2 and mean["teacher_frac"] == pytest.approx(1 / 3)


def run_with_the_copied_block(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """code run by a fresh python in a folder that holds only adaswitch_method.py: the block between the '=' lines of
    adaswitch.py (at most 270 of its at most 880 lines), copied alone as the README's sed command copies it.
    adaswitch.py cannot be imported there, so a name defined below the block fails."""
    lines = Path(A.__file__).read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if re.fullmatch(r"# =+ .* =+", line)]
    assert len(marks) == 2 and "the method" in lines[marks[0]] and "end of the method" in lines[marks[1]]
    block = lines[marks[0]:marks[1] + 1]
    assert len(block) <= 270 and len(lines) <= 880  # the caps of the block and of the whole file
    (tmp_path / "adaswitch_method.py").write_text("\n".join(block) + "\n")
    (tmp_path / "main.py").write_text(code)
    return subprocess.run([sys.executable, "main.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})


def test_the_method_block_runs_alone(tmp_path):
    """The copied block runs alone: an AdaSwitch rollout on tiny models switches as the main tests require, and its
    loss sends gradients to the student only."""
    check = """import torch
from adaswitch_method import SwitchTracker, rollout, sequence_loss
from transformers import GPT2Config, GPT2LMHeadModel
def tiny(seed, width):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=64, n_embd=width, n_layer=2, n_head=2,
                                      initializer_range=0.5, bos_token_id=1, eos_token_id=2)).eval()
student, teacher = tiny(0, 32), tiny(1, 64)
ids = torch.randint(3, 48, (3, 7), generator=torch.Generator().manual_seed(0))
mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4, [0] * 5 + [1] * 2])
ro = rollout(student, teacher, ids * mask, mask, "adaswitch", max_new_tokens=10, window=2, k=1.5, do_sample=False)
assert ((ro.switch_step > 2) & (ro.switch_step < 9)).any(), ro.switch_step  # a switch mid-way: the checks have teeth
switched, steps = ro.switch_step[:, None] >= 0, torch.arange(10)
assert torch.equal(ro.from_teacher, switched & (steps >= ro.switch_step[:, None]))
tracker = SwitchTracker(3, window=2, k=1.5)
for i in range(10):
    tracker.update(ro.divergences[:, i], ro.measured[:, i])
assert torch.equal(tracker.switch_step, ro.switch_step)
assert torch.equal(ro.measured, ~switched | (steps <= ro.switch_step[:, None]))  # d_i up to and with the switch
loss = sequence_loss(student.train(), teacher, ro)
loss.backward()
assert loss > 0 and student.lm_head.weight.grad.abs().sum() > 0
assert all(p.grad is None for p in teacher.parameters())
print("copied block ok")
"""
    result = run_with_the_copied_block(tmp_path, check)
    assert result.returncode == 0 and "copied block ok" in result.stdout, result.stderr[-3000:]


def test_the_readme_snippet_runs_with_the_copied_block(tmp_path):
    """The first python block after the README's heading '## The method in your own trainer' runs as printed beside
    the copied block alone (nothing of the program, such as stop_ids), on its tiny random models."""
    readme = (Path(A.__file__).parent / "README.md").read_text()
    section = readme.split("\n## The method in your own trainer\n", 1)
    assert len(section) == 2, "README.md has no heading '## The method in your own trainer'"
    snippet = re.search(r"```python\n(.*?)```", section[1], re.DOTALL).group(1)
    result = run_with_the_copied_block(tmp_path, snippet)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r"switch steps \[[-\d, ]+\], loss \d+\.\d+\n", result.stdout), result.stdout


# ----------------------------------------------------------------------------------------------------
# The program: every method end to end, reproducibility, DDP, clear errors, scores, the toy task.

SCRIPT = Path(__file__).resolve().with_name("adaswitch.py")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny teacher and student saved with save_pretrained (char tokenizer) and a jsonl dataset."""
    root = tmp_path_factory.mktemp("saved")
    tokenizer = A.char_tokenizer()
    for name, width in (("teacher", 48), ("student", 32)):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=width, n_layer=2, n_head=2,
                            bos_token_id=1, eos_token_id=1, pad_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"question": f"{a}+{b}=", "answer": f"#### {a + b}"} for a in range(8) for b in range(5)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root


def cli_args(saved: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(saved / "teacher"), "--student", str(saved / "student"),
            "--dataset", str(saved / "data.jsonl"), "--prompt-field", "question", "--response-field", "answer",
            "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "8", "--eval-samples", "4",
            "--log-every", "1", "--window", "2", "--skd-top-k", "3", "--output-dir", str(out),
            "--max-prompt-len", "48", *extra]  # 48 + 8 < 64 positions


def logged(out: Path, start: bool = False) -> list[dict]:
    """The training records of metrics.jsonl; with start, the step-0 record of the evaluations before training too."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records if start else [r for r in records if r["step"] > 0]


@pytest.mark.parametrize("method", ["sft", "supervised_kd", "off_policy", "on_policy", "skd", "adaswitch"])
def test_every_method_trains_logs_and_saves(saved, tmp_path, method):
    """Two steps of each method: finite losses logged per step, a summary, and a student that loads back."""
    summary = A.main(cli_args(saved, tmp_path, "--method", method))
    records = logged(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert {"switch_rate", "switch_pos", "teacher_frac", "divergence", "tokens_per_s", "lr"} <= set(records[0])
    assert summary["method"] == method and 0 <= summary["student_after"] <= 1
    assert logged(tmp_path, start=True)[0] == {"step": 0, "teacher_score": summary["teacher"],
                                               "eval_score": summary["student_before"]}
    expected_teacher_frac = {"sft": 0.0, "supervised_kd": 0.0, "on_policy": 0.0, "off_policy": 1.0}
    if method in expected_teacher_frac:
        assert records[0]["teacher_frac"] == expected_teacher_frac[method]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    start = AutoModelForCausalLM.from_pretrained(saved / "student")
    trained = dict(reloaded.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in start.named_parameters()), "training changed nothing"


def test_bfloat16_teacher_float32_student(saved, tmp_path):
    """--dtype applies to the teacher; the student keeps float32 weights (bf16 would round away AdamW updates)."""
    A.main(cli_args(saved, tmp_path, "--method", "adaswitch", "--dtype", "bfloat16"))
    assert json.loads((tmp_path / "student" / "config.json").read_text())["dtype"] == "float32"
    assert all(math.isfinite(r["loss"]) for r in logged(tmp_path))


def test_same_seed_same_losses(saved, tmp_path):
    """Rollouts are sampled from seeded generators: the same --seed repeats a run exactly, another seed does not."""
    losses = []
    for i, seed in enumerate((3, 3, 4)):
        A.main(cli_args(saved, tmp_path / str(i), "--method", "on_policy", "--seed", str(seed)))
        losses.append([r["loss"] for r in logged(tmp_path / str(i))])
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--window", "0", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and re.search(flag_name("--window"), result.stderr)


@pytest.mark.parametrize("extra, message", [
    (["--k", "-1"], r"\bk\b.*-1"),
    (["--method", "gkd"], "invalid choice: 'gkd'"),
    (["--dataset", "missing.jsonl"], r"missing\.jsonl: no such \.json/\.jsonl/\.csv file"),
    (["--prompt-field", "problem"], r"no field 'problem' \(fields: .*question.*\); set --prompt-field"),
    (["--method", "skd", "--skd-top-k", str(len(A.char_tokenizer()))],
     rf"--skd-top-k {len(A.char_tokenizer())} covers the {len(A.char_tokenizer())}-token vocabulary.*on_policy"),
])
def test_bad_input_names_the_problem(saved, tmp_path, extra, message):
    with pytest.raises(A.UsageError, match=message):
        A.main(cli_args(saved, tmp_path) + extra)


def test_empty_dataset(saved, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(A.UsageError, match=r"empty\.jsonl.*(empty|none|no rows)"):
        A.main(cli_args(saved, tmp_path, "--dataset", str(tmp_path / "empty.jsonl")))


def test_tokenizer_mismatch(saved, tmp_path):
    """A student whose tokenizer numbers the same characters differently is refused before any training."""
    other = tmp_path / "other-student"
    AutoModelForCausalLM.from_pretrained(saved / "student").save_pretrained(other)
    A.char_tokenizer("0123456789+=# abcdefgh"[::-1]).save_pretrained(other)
    with pytest.raises(A.UsageError, match="teacher.s and the student.s tokenizers differ"):
        A.main(cli_args(saved, tmp_path, "--student", str(other)))


@pytest.mark.parametrize("text, number", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("costs $5.50 then 12 left", "12"),
    ("#### -3.0", "-3"), ("answer 2.50 ####2.5 and 9", "2.5"), ("no digits", None),
])
def test_final_number(text, number):
    assert A.final_number(text) == number


def test_number_match_needs_a_number():
    assert A.number_match("#### 42", "ends with 42") == 1.0
    assert A.number_match("#### 41", "#### 42") == 0.0
    assert A.number_match("none", "none either") == 0.0


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "the cat is on the mat", 2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6)),  # LCS 5 of 6 and 6
    ("a b c d", "b d", 2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2)),                                   # LCS 'b d'
    ("x y", "a b", 0.0),
    ("", "a b", 0.0),
])
def test_rouge_l(prediction, reference, expected):
    assert A.rouge_l(prediction, reference) == pytest.approx(expected)


def test_toy_task_is_correct_and_splits_are_disjoint():
    train, test = A.toy_rows("toy", 3, test_size=50, train_size=500)
    for row in train[:100] + test:
        a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
        assert int(A.final_number(row["response"])) == a + b
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    tokenizer = A.char_tokenizer()
    text = test[0]["prompt"] + test[0]["response"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_encode_templates_cuts_and_eos():
    """Chat template when the tokenizer has one (not with --no-chat-template); long prompts lose the start of
    their content but keep the template; responses (the assistant turn, or the text then EOS) are cut on the right."""
    tokenizer = A.char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ '#' + m['content'] + '=' if m['role'] == 'user' else " \
                              "m['content'] + '#' }}{% endfor %}"
    rows = [{"prompt": "12+34", "response": "46"}]
    args = A.parse_args(["--max-prompt-len", "4", "--max-new-tokens", "2"])
    [example] = A.encode(rows, tokenizer, args)
    assert tokenizer.decode(example["prompt"]) == "#34="                   # '#12+34=' keeps its markup
    assert example["response"] == tokenizer("46")["input_ids"]             # '46#' cut by --max-new-tokens
    [plain] = A.encode(rows, tokenizer, A.parse_args(["--no-chat-template"]))
    assert tokenizer.decode(plain["prompt"]) == "12+34"
    assert plain["response"][-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------
# An instruct-style checkpoint: its turns end with <|eot|>, which is not the tokenizer's EOS; the teacher's
# generation_config lists both (as Llama-3 Instruct, Qwen2.5-Instruct, Gemma-it do), the student's only EOS.

CHAT_SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|eot|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eot|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tokenizer():
    """Character-level, with the chat markup as single special tokens and a Jinja chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(CHAT_SPECIALS + list("0123456789abcdefghijklmnopqrstuvwxyz "))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(CHAT_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_prompt(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """A tiny Llama teacher trained (200 steps, about a second) to answer every user turn with 'ok<|eot|>', and a
    random Llama student, saved with their tokenizer; a jsonl of digit prompts answered 'ok'."""
    root = tmp_path_factory.mktemp("instruct")
    tokenizer = chat_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    rng = random.Random(0)
    for name, width in (("teacher", 48), ("student", 32)):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        model = LlamaForCausalLM(config)
        if name == "teacher":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(200):
                texts = [tokenizer.apply_chat_template(
                    [{"role": "user", "content": str(rng.randrange(1000))}, {"role": "assistant", "content": "ok"}],
                    tokenize=False) + "zzz" for _ in range(16)]  # after the turn end: text, not EOS
                ids = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, eot]
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"prompt": str(rng.randrange(1000)), "response": "ok"} for _ in range(40)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root


def instruct_cli(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(root / "teacher"), "--student", str(root / "student"), "--dataset",
            str(root / "chat.jsonl"), "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "8",
            "--eval-samples", "4", "--log-every", "1", "--window", "2", "--score", "exact", "--output-dir", str(out),
            "--max-prompt-len", "48", *extra]


def test_stop_ids_join_the_tokenizer_eos_and_every_generation_config(instruct):
    """stop_ids = the tokenizer's EOS + the teacher's list + the student's int, deduplicated and sorted."""
    tokenizer = AutoTokenizer.from_pretrained(instruct / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(instruct / "teacher")
    student = AutoModelForCausalLM.from_pretrained(instruct / "student")
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot|>")
    assert teacher.generation_config.eos_token_id == [eos, eot] and student.generation_config.eos_token_id == eos
    assert A.stop_ids(tokenizer, teacher, student) == sorted([eos, eot])
    assert A.stop_ids(tokenizer, student) == [eos]


def test_rollout_stops_at_the_turn_end_like_generate(instruct):
    """The teacher ends its answer with <|eot|>: a greedy rollout stopping at stop_ids == generate with the model's
    own generation_config, and each completion ends at the turn end (with the tokenizer's EOS alone it runs on)."""
    tokenizer = AutoTokenizer.from_pretrained(instruct / "teacher", padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(instruct / "teacher").eval()
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    batch = tokenizer([chat_prompt(tokenizer, p) for p in ("7", "42", "316")], add_special_tokens=False,
                      padding=True, return_tensors="pt")
    P = batch["input_ids"].shape[1]
    reference = teacher.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert tokenizer.batch_decode(reference[:, P:]) == ["ok<|eot|>"] * 3  # generate stops at the turn end
    for mode, pair in (("teacher", (None, teacher)), ("student", (teacher, None))):
        ro = rollout(*pair, batch["input_ids"], batch["attention_mask"], mode, max_new_tokens=8, do_sample=False,
                     eos_token_id=A.stop_ids(tokenizer, teacher), pad_token_id=0)
        assert torch.equal(ro.sequences, reference), mode
        assert ro.completion_mask.sum(-1).tolist() == [3, 3, 3]
    eos_only = rollout(None, teacher, batch["input_ids"], batch["attention_mask"], "teacher", max_new_tokens=8,
                       do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    assert eos_only.completion_mask.sum(-1).tolist() == [8, 8, 8]  # the bug this guards against
    assert (eos_only.sequences[:, P + 2] == eot).all()


def test_encode_ends_chat_responses_with_the_turn_end():
    """With a chat template the response ids are the assistant turn as the template renders it: 'ok<|eot|>', no
    EOS after it; with --no-chat-template: the response, then EOS. Both cut to --max-new-tokens."""
    tokenizer = chat_tokenizer()
    eot, eos = tokenizer.convert_tokens_to_ids("<|eot|>"), tokenizer.eos_token_id
    ok = tokenizer("ok", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "12", "response": "ok"}]
    [chat] = A.encode(rows, tokenizer, A.parse_args([]))
    assert tokenizer.decode(chat["prompt"]) == "<|user|>12<|eot|><|assistant|>"
    assert chat["response"] == ok + [eot]
    [plain] = A.encode(rows, tokenizer, A.parse_args(["--no-chat-template"]))
    assert plain["response"] == ok + [eos]
    [cut] = A.encode(rows, tokenizer, A.parse_args(["--max-new-tokens", "2"]))
    assert cut["response"] == ok


def test_instruct_teacher_scores_through_the_cli_as_with_generate(instruct, tmp_path):
    """Off-policy through the CLI on the instruct pair: the teacher's score equals its generate score (1.0: it
    answers 'ok<|eot|>' to every prompt), and the logged completions end at the turn end (3 tokens, not 8)."""
    tokenizer = AutoTokenizer.from_pretrained(instruct / "teacher", padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(instruct / "teacher").eval()
    rows = [json.loads(line) for line in (instruct / "chat.jsonl").read_text().splitlines()]
    batch = tokenizer([chat_prompt(tokenizer, r["prompt"]) for r in rows], add_special_tokens=False, padding=True,
                      return_tensors="pt")
    generated = teacher.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=0)
    texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    generate_score = sum(A.SCORES["exact"](t, r["response"]) for t, r in zip(texts, rows)) / len(rows)
    assert generate_score == 1.0
    summary = A.main(instruct_cli(instruct, tmp_path, "--method", "off_policy", "--lr", "1e-8"))
    assert summary["teacher"] == generate_score
    assert [r["completion_len"] for r in logged(tmp_path)] == [3.0, 3.0]
    assert summary["completion_len"] == 3.0


def test_adaswitch_on_a_saved_llama_pair(instruct, tmp_path):
    """Two AdaSwitch steps end to end on the Llama-family pair with a chat template: metrics logged, student saved
    and loadable, trained weights differ from the start."""
    A.main(instruct_cli(instruct, tmp_path, "--method", "adaswitch"))
    records = logged(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert all(1 <= r["completion_len"] <= 8 for r in records)
    saved_student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert isinstance(saved_student, LlamaForCausalLM)
    start = dict(AutoModelForCausalLM.from_pretrained(instruct / "student").named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in saved_student.named_parameters())


# ----------------------------------------------------------------------------------------------------
# Bad input, as a user meets it: `python adaswitch.py ...` exits non-zero with one line on stderr that names
# the problem, no traceback, and nothing trained.

NO_MODELS = ["--teacher", "/no/such/teacher", "--student", "/no/such/student"]  # flags must fail before loading


def flag_name(flag: str) -> str:
    """A pattern for the flag's name in a message: '--warmup-ratio' matches 'warmup-ratio' or 'warmup_ratio'."""
    return r"\b" + flag.lstrip("-").replace("-", "[-_]") + r"\b"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def model_without(saved: Path, tmp: Path, part: str) -> str:
    """A copy of the saved student without its tokenizer files ('tokenizer') or without its model ('config')."""
    folder = tmp / f"student-without-{part}"
    if part == "tokenizer":
        AutoModelForCausalLM.from_pretrained(saved / "student").save_pretrained(folder)
    else:
        A.char_tokenizer().save_pretrained(folder)
    return str(folder)


MISSING_HUB_ID = "nobody-here/no-such-model"
# A folder without tokenizer files loads as an empty GPT2Tokenizer in transformers 5: the message must say that
# the tokenizer is missing, not that two tokenizers differ.
NOT_A_MISMATCH = r"^(?!.*\bdiffer).*(?i:tokenizer)"
GOOD_ROWS = "".join(json.dumps({"question": f"{i}+1=", "answer": f"#### {i + 1}"}) + "\n" for i in range(20))

# (id, extra CLI arguments given saved and tmp_path, extra environment, patterns the error line must contain)
BAD_INPUTS = [
    ("temperature-0", lambda s, t: NO_MODELS + ["--temperature", "0"], {}, [flag_name("--temperature")]),
    ("temperature-nan", lambda s, t: NO_MODELS + ["--temperature", "nan"], {}, [flag_name("--temperature")]),
    ("beta-1-loss-jsd", lambda s, t: NO_MODELS + ["--loss", "jsd", "--beta", "1"], {}, [flag_name("--beta")]),
    ("switch-beta-0-switch-metric-jsd", lambda s, t: NO_MODELS + ["--switch-metric", "jsd", "--switch-beta", "0"], {},
     [flag_name("--switch-beta")]),
    ("lr-0", lambda s, t: NO_MODELS + ["--lr", "0"], {}, [flag_name("--lr")]),
    ("warmup-ratio-1.5", lambda s, t: NO_MODELS + ["--warmup-ratio", "1.5"], {}, [flag_name("--warmup-ratio")]),
    ("student-folder-missing", lambda s, t: ["--student", str(t / "no-such-student")], {}, [r"no-such-student"]),
    ("teacher-folder-missing", lambda s, t: ["--teacher", str(t / "no-such-teacher")], {}, [r"no-such-teacher"]),
    ("hub-id-offline", lambda s, t: ["--teacher", MISSING_HUB_ID, "--student", MISSING_HUB_ID], {"HF_HUB_OFFLINE": "1"},
     [MISSING_HUB_ID]),
    ("folder-without-tokenizer", lambda s, t: ["--student", model_without(s, t, "tokenizer")], {},
     [r"student-without-tokenizer", NOT_A_MISMATCH]),
    ("both-folders-without-tokenizer", lambda s, t: ["--student", model_without(s, t, "tokenizer"), "--teacher",
                                                     str(t / "student-without-tokenizer")], {},
     [r"student-without-tokenizer", NOT_A_MISMATCH]),
    ("folder-without-config", lambda s, t: ["--student", model_without(s, t, "config")], {},
     [r"student-without-config"]),
    ("malformed-jsonl", lambda s, t: ["--dataset", write(t / "bad.jsonl", GOOD_ROWS[:100] + '{"question": "1+\n'
                                                         + GOOD_ROWS)], {}, [r"bad\.jsonl", r"line 3\b"]),
    ("ragged-csv", lambda s, t: ["--dataset", write(t / "bad.csv", "question,answer\n1+1=,#### 2\n2+2=,#### 4\n"
                                                    "3+3=,#### 6,extra\n4+4=,#### 8\n")], {},
     [r"bad\.csv", r"line 4\b"]),
    ("all-prompts-null", lambda s, t: ["--dataset", write(t / "nulls.json", json.dumps(
        [{"question": None, "answer": f"#### {i}"} for i in range(20)]))], {}, [r"nulls\.json"]),
    ("list-in-prompt", lambda s, t: ["--dataset", write(t / "lists.jsonl", GOOD_ROWS + json.dumps(
        {"question": ["1", "+", "1"], "answer": "#### 2"}) + "\n")], {}, [r"lists\.jsonl", r"row 21\b"]),
    ("max-new-tokens-over-positions", lambda s, t: ["--max-new-tokens", "100"], {},
     [flag_name("--max-new-tokens"), r"\b64\b"]),
]


def earlier_run(saved: Path, tmp: Path, *extra: str, state: bytes | None = None) -> list[str]:
    """tmp/out as a run with cli_args' flags leaves it (args.json), with a checkpoint-2/state.pt holding `state` if
    given; returns extra, the flags of the new command."""
    out = tmp / "out"
    out.mkdir()
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(A.parse_args(cli_args(saved, out)))))
    if state is not None:
        (out / "checkpoint-2").mkdir()
        (out / "checkpoint-2" / "state.pt").write_bytes(state)
    return list(extra)


BAD_INPUTS += [
    ("run-already-there", lambda s, t: earlier_run(s, t), {}, [r"already holds a run", "--resume", "--overwrite"]),
    ("resume-without-run", lambda s, t: ["--resume"], {}, [r"holds no run"]),
    ("resume-without-output-dir", lambda s, t: ["--resume", "--output-dir", ""], {}, [flag_name("--output-dir")]),
    ("resume-other-batch-size", lambda s, t: earlier_run(s, t, "--resume", "--batch-size", "2"), {},
     [flag_name("--batch-size"), r"\b2\b", r"\b4\b"]),
    ("resume-other-method", lambda s, t: earlier_run(s, t, "--resume", "--method", "sft"), {}, [flag_name("--method")]),
    ("resume-without-checkpoint", lambda s, t: earlier_run(s, t, "--resume"), {}, [r"no whole checkpoint"]),
    ("output-dir-under-a-file", lambda s, t: ["--output-dir", write(t / "file", "") + "/run"], {},
     [r"--output-dir \S*file/run: \S*file is a file, not a folder"]),
    ("resume-damaged-checkpoint", lambda s, t: earlier_run(s, t, "--resume", state=b"not a checkpoint"), {},
     [r"state\.pt", r"damaged"]),
]


@pytest.mark.parametrize("case, extra, env, patterns", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_through_the_cli(saved, tmp_path, case, extra, env, patterns):
    """Exit code != 0, exactly one stderr line starting 'error:' that names the problem, no traceback, no student."""
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), *cli_args(saved, out), *extra(saved, tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, **env})
    stderr = result.stderr.strip()
    assert result.returncode != 0, result.stdout[-1000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error:"), stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, stderr), (pattern, stderr)
    assert not (out / "student").exists()


@pytest.mark.parametrize("flags", [
    ["--temperature", "0"], ["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "inf"],
    ["--loss", "jsd", "--beta", "0"], ["--loss", "jsd", "--beta", "1"],
    ["--switch-metric", "jsd", "--switch-beta", "0"], ["--switch-metric", "jsd", "--switch-beta", "1"],
    ["--window", "0"], ["--k", "-1"], ["--k", "nan"], ["--lr", "0"], ["--lr", "nan"], ["--lr", "-1e-4"],
    ["--warmup-ratio", "1.5"], ["--warmup-ratio", "-0.1"], ["--seed", "-1"], ["--weight-decay", "inf"],
], ids=" ".join)
def test_parse_args_refuses_undefined_mathematics(flags):
    """Flag values that make the mathematics undefined are refused by parse_args, naming the flag."""
    with pytest.raises(A.UsageError, match=flag_name(flags[-2])):
        A.parse_args(flags)


def test_each_jsd_weight_is_checked_only_for_its_own_divergence():
    """--beta weighs the loss's JSD, --switch-beta the switch rule's: a weight outside (0, 1) is fine where its own
    divergence is not a JSD, whatever the other divergence is."""
    args = A.parse_args(["--switch-metric", "jsd", "--beta", "0", "--loss", "fkl"])
    assert (args.switch_metric, args.switch_beta, args.loss, args.beta) == ("jsd", 0.5, "fkl", 0.0)
    args = A.parse_args(["--loss", "jsd", "--switch-beta", "1", "--switch-metric", "tvd"])
    assert (args.loss, args.beta, args.switch_metric, args.switch_beta) == ("jsd", 0.5, "tvd", 1.0)


def test_the_switch_flags_reach_the_rollout_and_beta_does_not(student, teacher, prompts):
    """The program's training sequences (make_sequences) are rollout's with switch_metric = --switch-metric and
    switch_beta = --switch-beta; --beta, the loss's JSD weight, changes none of the rollout's divergences."""
    flags = ["--method", "adaswitch", "--switch-metric", "jsd", "--switch-beta", "0.2", "--loss", "jsd",
             "--beta", "0.9", "--max-new-tokens", str(N), "--window", "2", "--k", "1.1", *NO_MODELS]
    batch = {"prompt_ids": prompts[0], "prompt_mask": prompts[1]}
    ours = A.make_sequences(batch, student, teacher, A.parse_args(flags), [], PAD, torch.Generator().manual_seed(0))
    for switch_beta, same in ((0.2, True), (0.9, False)):
        theirs = rollout(student, teacher, *prompts, "adaswitch", max_new_tokens=N, window=2, k=1.1,
                         switch_metric="jsd", switch_beta=switch_beta, eos_token_id=[], pad_token_id=PAD,
                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(ours.divergences, theirs.divergences) == same, switch_beta


def test_rows_with_missing_null_or_blank_fields_are_dropped_and_counted(tmp_path, capsys):
    """Null, missing, empty and blank prompts / responses are dropped with a printed count; none becomes 'None'."""
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(36)]
    rows += [{"prompt": None, "response": "a"}, {"prompt": "q"}, {"prompt": "", "response": "a"},
             {"prompt": "q", "response": "  \n"}]
    path = write(tmp_path / "holes.jsonl", "\n".join(json.dumps(row) for row in rows))
    train, test = A.load_rows(A.parse_args(["--dataset", path, "--eval-samples", "4", *NO_MODELS]))
    assert re.search(r"dropped 4 of 40\b", capsys.readouterr().out)
    assert len(train) + len(test) == 36
    assert all(r["prompt"].strip() and r["response"].strip() and "None" not in r["prompt"] + r["response"]
               for r in train + test)
    csv_path = write(tmp_path / "holes.csv", "prompt,response\n" + "".join(f"q{i},a{i}\n" for i in range(9)) + "q,\n")
    train, test = A.load_rows(A.parse_args(["--dataset", csv_path, "--eval-samples", "2", *NO_MODELS]))
    assert re.search(r"dropped 1 of 10\b", capsys.readouterr().out) and len(train) + len(test) == 9


def test_long_prompts_that_do_not_fit_the_model_positions_are_refused(saved, tmp_path):
    """--max-prompt-len 60 + --max-new-tokens 8 > 64 positions (a prompt of 60 tokens would index past the position
    table): one line naming the --max-prompt-len that fits, before the run's folder is written."""
    with pytest.raises(A.UsageError, match=r"^--max-prompt-len 60 \+ --max-new-tokens 8 exceed the models' 64 "
                                           r"positions: use --max-prompt-len <= 56$"):
        A.main(cli_args(saved, tmp_path, "--max-prompt-len", "60"))
    assert not (tmp_path / "args.json").exists()


# ----------------------------------------------------------------------------------------------------
# Things that could pass by accident: dtypes, gradient accumulation, ROUGE-L against the reference package.


def test_bfloat16_teacher_and_float32_student_in_memory(saved, tmp_path, monkeypatch):
    """Through the CLI with --dtype bfloat16, train() gets a teacher with bfloat16 weights and a float32 student."""
    seen = {}
    train = A.train

    def spy(student, teacher, *args, **kwargs):
        seen["student"] = {p.dtype for p in student.parameters()}
        seen["teacher"] = {p.dtype for p in teacher.parameters()}
        return train(student, teacher, *args, **kwargs)

    monkeypatch.setattr(A, "train", spy)
    A.main(cli_args(saved, tmp_path, "--method", "adaswitch", "--dtype", "bfloat16"))
    assert seen == {"teacher": {torch.bfloat16}, "student": {torch.float32}}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_autocast_rule_per_dtype_and_device(dtype, device):
    """--dtype bfloat16: bf16 autocast on any device; --dtype float32: no autocast, on a GPU too. The context object is
    inspected, so no GPU is needed (entered, a cuda autocast would need one)."""
    with warnings.catch_warnings():  # torch warns, building a cuda autocast on a machine without CUDA
        warnings.simplefilter("ignore")
        context = A.training_autocast(dtype, torch.device(device))
    if dtype == "float32":
        assert not isinstance(context, torch.autocast), context
    else:
        assert isinstance(context, torch.autocast) and (context.device, context.fast_dtype) == (device, torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_training_step_enters_the_autocast_of_its_dtype(saved, tmp_path, monkeypatch, dtype):
    """Through the CLI on the CPU: every loss of a step is computed under bf16 autocast with --dtype bfloat16, and
    under none with --dtype float32 (the rollout of the step runs in the same context)."""
    seen, loss = [], A.sequence_loss

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return loss(*args, **kwargs)

    monkeypatch.setattr(A, "sequence_loss", spy)
    A.main(cli_args(saved, tmp_path, "--method", "adaswitch", "--dtype", dtype))
    assert len(seen) == 2  # two steps of one micro-batch
    assert set(seen) == {(True, torch.bfloat16)} if dtype == "bfloat16" else {enabled for enabled, _ in seen} == {False}


@pytest.mark.parametrize("method", ["sft", "supervised_kd"])
def test_gradient_accumulation_equals_one_big_batch(teacher, method, monkeypatch):
    """On ground-truth sequences of unequal lengths, 2 micro-batches of 2 give the gradient of 1 batch of 4: each
    token weighs the same (not each micro-batch), and padding changes nothing."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=EOS, pad_token_id=PAD)
    start = GPT2LMHeadModel(config)
    tokenizer = A.char_tokenizer()
    gen = torch.Generator().manual_seed(0)
    examples = [{"prompt": torch.randint(3, 17, (p,), generator=gen).tolist(),
                 "response": torch.randint(3, 17, (r,), generator=gen).tolist(), "reference": ""}
                for p, r in ((3, 1), (5, 2), (2, 5), (4, 6))]  # 3 and 11 response tokens per micro-batch
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(parameters, *args, **kwargs):
        parameters = list(parameters)
        grads.append(torch.cat([p.grad.flatten() for p in parameters]))
        return clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    for batch_size, accum in ((4, 1), (2, 2)):
        args = A.parse_args(["--method", method, "--max-steps", "1", "--batch-size", str(batch_size),
                             "--grad-accum", str(accum)])
        batches = A.batch_stream(examples, batch_size, PAD, "cpu")
        A.train(copy.deepcopy(start), teacher, batches, args, tokenizer, A.stop_ids(tokenizer))
    # Clipping sees the gradient of the mean token loss over the window (whole logits, as written before chunking),
    # not the sum: a sum would make clipping fire at every step and weigh long windows more.
    model, seq = copy.deepcopy(start), A.make_sequences(next(A.batch_stream(examples, 4, PAD, "cpu")), None, None,
                                                        args, [EOS], PAD)
    full_logits_loss(model.train(), None if method == "sft" else teacher, seq, "fkl", 1.0).backward()
    mean = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert len(grads) == 2 and grads[0].abs().sum() > 0
    # Float32 sums in other orders (chunks, micro-batches): 1e-4 relative, far below the 11x or 3x of a missing division
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[0], mean, rtol=1e-4, atol=1e-6)


ROUGE_PAIRS = [
    ("The cat sat on the mat.", "the cat sat on the mat"),
    ("It will help.", "It will help you, they said"),
    ("Bob's 3 dogs (aged 2-4) ran 10km!", "bob s 3 dogs ran 10 km"),
    ("Naïve café owners in Tōkyō", "naive cafe owners in tokyo"),
    ("東京 is big", "東京 is large"),
    ("", "a non-empty reference"),
    ("a non-empty prediction", ""),
    ("", ""),
    ("...", "!!!"),
    ("#Person1# asks #Person2# for help; #Person2# agrees.", "#Person2# agrees to help #Person1#."),
    ("A B C D", "b d"),
    ("the the the", "the"),
]


@pytest.mark.parametrize("prediction, reference", ROUGE_PAIRS)
def test_rouge_l_equals_rouge_score(prediction, reference):
    """ROUGE-L F1 == the rouge_score package's (default tokenizer: lower case, non-[a-z0-9] separate, no stemming)."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert A.rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# The tutorial notebook


def test_tutorial_notebook_runs_at_smoke_size(tmp_path, monkeypatch, pair):
    """tutorial.ipynb executed top to bottom by a python3 kernel with ADASWITCH_SMOKE=1 (about 2 minutes): its own
    checks must hold (the recomputed switch rule), its figures are saved, and everything it writes (toy models,
    runs, figures, kernel and matplotlib files) lands in tmp_path."""
    import os

    import nbformat
    from nbclient import NotebookClient

    here = Path(__file__).resolve().parent
    env = {"ADASWITCH_SMOKE": "1", "ADASWITCH_RUNS": tmp_path / "runs", "ADASWITCH_FIGURES": tmp_path / "figures",
           "ADASWITCH_GEMMA": pair,  # the real pair of section 8, built once for the session (conftest.py)
           "PYTHONPATH": os.pathsep.join(p for p in (str(here), os.environ.get("PYTHONPATH")) if p),
           "MPLCONFIGDIR": tmp_path / "matplotlib", "IPYTHONDIR": tmp_path / "ipython",
           "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter", "PYTHONDONTWRITEBYTECODE": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    notebook = nbformat.read(here / "tutorial.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on the first failing cell
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "comparison.png", "distributions.png", "divergence_kinds.png", "k_sweep.png", "ladder.png", "real_divergence.png",
        "real_k_sweep.png", "real_training.png", "short_completions.png", "summary_divergence.png", "tracker.png",
        "training_step.png", "weak_strong.png"]
    assert all((tmp_path / "runs" / "tutorial" / f"{m}-0" / "summary.json").exists()
               for m in ("sft", "supervised_kd", "off_policy", "on_policy", "skd", "adaswitch"))
    ladder = json.loads((tmp_path / "runs" / "ladder" / "ladder.json").read_text())  # section 8.5: two rungs
    assert sorted(ladder["rungs"]) == ["0", "5"] and ladder["rungs"]["5"]["kl"] > 0 == ladder["rungs"]["0"]["kl"]


def test_read_file_takes_what_real_files_hold(tmp_path):
    """A spreadsheet CSV with a byte-order mark, JSON Lines with U+2028 inside a string, JSON Lines saved as .json
    and a .json list all give the same rows; splitlines() or a plain utf-8 read would break the first two."""
    rows = [{"prompt": "one\u2028two", "response": "3"}, {"prompt": "four", "response": "5"}]
    (tmp_path / "a.csv").write_text("prompt,response\n" + "".join(f'"{r["prompt"]}",{r["response"]}\n' for r in rows),
                                    encoding="utf-8-sig")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("a.csv", "b.jsonl", "c.json", "d.json"):
        assert A.read_file(tmp_path / name) == rows, name


def test_bad_data_stops_the_run_before_any_model_loads(saved, tmp_path):
    """A malformed data file is reported even when the model folders do not exist: data is read first."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": }\n')
    with pytest.raises(A.UsageError, match=r"bad\.jsonl, line 2"):
        A.main(["--teacher", str(tmp_path / "none"), "--student", str(tmp_path / "none"),
                "--dataset", str(tmp_path / "bad.jsonl")])


@pytest.mark.parametrize("flag", ["--output-dir", "--toy-dir"])
def test_a_folder_flag_that_names_a_file_is_refused(tmp_path, flag):
    """Both folders a run writes into are checked at parse time, not after training (mkdir's traceback)."""
    (tmp_path / "taken").write_text("")
    with pytest.raises(A.UsageError, match=f"{flag} .*taken is a file"):
        A.parse_args([flag, str(tmp_path / "taken")])


def test_long_prompt_cut_keeps_the_template_with_byte_level_bpe():
    """Byte-level BPE (Llama-3, Qwen, Gemma): cutting the content's start mid-character and re-tokenizing can make
    the prompt longer again; the cut goes on until it fits, so BOS and the chat markup stay, and no U+FFFD is left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    core.train_from_iterator(["hello world 😀 東京"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [{"prompt": "😀😀😀😀😀😀 hello 東京", "response": "ok"}]
    for limit in range(20, 36):  # the old cut lost BOS and the markup at every odd limit from 23 on
        [example] = A.encode(rows, tokenizer, A.parse_args(["--max-prompt-len", str(limit)]))
        text = tokenizer.decode(example["prompt"])
        assert len(example["prompt"]) <= limit and example["prompt"][0] == tokenizer.bos_token_id, (limit, text)
        assert text.startswith("<bos><user>") and text.endswith("東京<eos><assistant>") and "\ufffd" not in text
    with pytest.raises(A.UsageError, match="cannot hold the prompt's template"):
        A.encode(rows, tokenizer, A.parse_args(["--max-prompt-len", "8"]))


# ----------------------------------------------------------------------------------------------------
# Long runs: checkpoints and exact resume, a killed run, non-finite losses, memory over --grad-accum, folders.

METHODS = ["sft", "supervised_kd", "off_policy", "on_policy", "skd", "adaswitch"]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def same_run(a: Path, b: Path):
    """Two runs logged the same records (timing aside) and saved bit-identical students."""
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # noqa: E731
    assert strip(logged(a, start=True)) == strip(logged(b, start=True))
    wa, wb = weights(a / "student"), weights(b / "student")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_the_uninterrupted_run(saved, tmp_path, method, monkeypatch):
    """Stopped during step 4 (after the step-2 checkpoint and the step-3 record), then resumed: the same records (the
    step-3 record is not doubled), the same summary and bit-identical weights as a run never stopped."""
    flags = ["--method", method, "--max-steps", "5", "--save-every", "2", "--eval-every", "2"]
    whole = A.main(cli_args(saved, tmp_path / "whole", *flags))
    stats, calls = A.sequence_stats, []

    def interrupted(seqs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of step 4
        return stats(seqs)
    monkeypatch.setattr(A, "sequence_stats", interrupted)
    with pytest.raises(KeyboardInterrupt):
        A.main(cli_args(saved, tmp_path / "cut", *flags))
    monkeypatch.undo()
    assert [r["step"] for r in logged(tmp_path / "cut")] == [1, 2, 3]
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = A.main(cli_args(saved, tmp_path / "cut", *flags, "--resume"))
    same_run(tmp_path / "whole", tmp_path / "cut")
    timing = ("train_seconds", "seconds_per_step", "total_seconds", "args")
    assert {k: v for k, v in whole.items() if k not in timing} == {k: v for k, v in resumed.items() if k not in timing}
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-5"]


def test_ctrl_c_ends_a_run_with_one_line_and_resume_continues_it(saved, tmp_path):
    """SIGINT (Ctrl-C) in the middle of training: exit code 1 and one stderr line saying how to continue, no
    traceback; the checkpoint written before it is whole, and --resume runs the rest to the end."""
    out = tmp_path / "run"
    command = [sys.executable, str(SCRIPT), *cli_args(saved, out, "--max-steps", "40", "--save-every", "2")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "metrics.jsonl").exists() or len(logged(out)) < 4:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: run the same command with --resume"), stderr
    assert [p for p in out.glob("checkpoint-*") if (p / "state.pt").is_file()]
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and max(r["step"] for r in logged(out)) == 40, resumed.stderr[-2000:]


def test_a_killed_run_resumes_to_the_same_student(saved, tmp_path):
    """SIGKILL in the middle of training loses at most --save-every steps, and --resume ends with the student of a
    run that was never killed. An interrupted save (a checkpoint folder without state.pt) is passed over."""
    flags = ["--method", "adaswitch", "--max-steps", "16", "--save-every", "3", "--eval-every", "0"]
    command = lambda out, *extra: [sys.executable, str(SCRIPT), *cli_args(saved, out, *flags), *extra]  # noqa: E731
    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = tmp_path / "cut"
    process = subprocess.Popen(command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (cut / "metrics.jsonl").exists() or len(logged(cut)) < 7:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    last = max(r["step"] for r in logged(cut))
    (saved_step,) = [int(p.name.split("-")[1]) for p in cut.glob("checkpoint-*") if (p / "state.pt").exists()]
    assert last - 3 <= saved_step <= last < 16
    (cut / f"checkpoint-{saved_step + 1}" / "student").mkdir(parents=True)  # a save killed before its state.pt
    resumed = subprocess.run(command(cut, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_run(tmp_path / "whole", cut)


def advised(message: str) -> list[str]:
    """The flags of the command a stopping message prints after its last ': ', checked to be adaswitch.py's."""
    command = shlex.split(message.rsplit(": ", 1)[1])
    assert command[:2] == ["python", os.path.relpath(SCRIPT)], message
    return command[2:]


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C in the middle of training step `step` (after its update, before its log and checkpoint)."""
    stats, calls = A.sequence_stats, []

    def interrupted(seqs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return stats(seqs)
    monkeypatch.setattr(A, "sequence_stats", interrupted)


def nan_loss_at(monkeypatch, step: int) -> None:
    """sequence_loss is NaN at its step-th call (one micro-batch a step: at that training step), as an overflow makes it."""
    loss, calls = A.sequence_loss, []

    def nan_at(*args, **kwargs):
        calls.append(1)
        return loss(*args, **kwargs) * (math.nan if len(calls) == step else 1.0)
    monkeypatch.setattr(A, "sequence_loss", nan_at)


def test_a_non_finite_loss_stops_before_the_update(saved, tmp_path, monkeypatch):
    """A NaN loss at step 3 stops the run with one line naming the step; the step-2 checkpoint stays, no step-3 one, and
    the student in memory is still the step-2 student (the NaN gradient never reached the weights). Those weights are
    checkpoint-2's: resuming would replay step 3 on them, so the line says to start again with a lower --lr, and that
    command runs to the end."""
    load, loaded = A.load_models, []
    monkeypatch.setattr(A, "load_models", lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[-1])
    nan_loss_at(monkeypatch, 3)
    with pytest.raises(A.UsageError, match=r"^step 3: the loss is nan .*checkpoint-2 holds those weights: start again "
                                           r"with a lower --lr: ") as stopped:
        A.main(cli_args(saved, tmp_path, "--method", "on_policy", "--max-steps", "4", "--save-every", "1"))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "state.pt").exists()
    in_memory, step_2 = loaded[0][2].state_dict(), weights(tmp_path / "checkpoint-2" / "student")
    assert all(torch.equal(in_memory[name], step_2[name]) for name in step_2)
    flags = advised(str(stopped.value))
    assert "--overwrite" in flags and "--resume" not in flags and flags[flags.index("--lr") + 1] == "1e-06"
    A.main(flags)
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3, 4]


def test_a_non_finite_loss_continues_from_the_checkpoint_with_the_printed_lower_lr(saved, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 4 after the step-2 checkpoint (whose weights passed step 3 since): the line names checkpoint-2
    and a command with --resume and a lower --lr. That command runs to the last step, prints the change, records it in
    args.json, and the schedule goes on from step 2 at the new peak rate (metrics.jsonl's lr)."""
    nan_loss_at(monkeypatch, 4)
    with pytest.raises(A.UsageError, match=rf"^step 4: the loss is nan .*; continue from "
                                           rf"{re.escape(str(tmp_path / 'checkpoint-2'))} with a lower --lr: ") as stopped:
        A.main(cli_args(saved, tmp_path, "--method", "on_policy", "--max-steps", "5", "--save-every", "2"))
    monkeypatch.undo()
    flags = advised(str(stopped.value))
    assert "--resume" in flags and "--overwrite" not in flags and flags[flags.index("--lr") + 1] == "1e-06"
    capsys.readouterr()
    A.main(flags)
    assert f"resuming from step 2 of {tmp_path}, --lr 1e-06 (was 1e-05)\n" in capsys.readouterr().out
    run = json.loads((tmp_path / "args.json").read_text())
    assert run["lr"] == 1e-6 and run["changes"] == [{"step": 2, "lr": [1e-5, 1e-6]}]
    lr = {r["step"]: r["lr"] for r in logged(tmp_path)}
    assert sorted(lr) == [1, 2, 3, 4, 5]
    # No warm-up (round(0.1 * 5) = 0 steps), then linear decay to 0 at step 5: the rate after step s is peak (5 - s) / 5.
    assert lr[2] == pytest.approx(1e-5 * 3 / 5) and lr[3] == pytest.approx(1e-6 * 2 / 5)
    assert lr[4] == pytest.approx(1e-6 * 1 / 5)


def test_resume_may_change_the_flags_that_keep_the_data_and_the_shapes(saved, tmp_path, monkeypatch, capsys):
    """--resume with another --max-grad-norm, --weight-decay and --dtype: printed, recorded in args.json with the step,
    and the optimizer steps with the new weight decay (the final checkpoint's state); other flags stay refused
    (BAD_INPUTS: --batch-size, --method)."""
    interrupt_at(monkeypatch, 3)  # after checkpoint-2
    with pytest.raises(KeyboardInterrupt):
        A.main(cli_args(saved, tmp_path, "--max-steps", "3", "--save-every", "2"))
    monkeypatch.undo()
    capsys.readouterr()
    A.main(cli_args(saved, tmp_path, "--max-steps", "3", "--save-every", "2", "--resume", "--max-grad-norm", "0.5",
                    "--weight-decay", "0.1", "--dtype", "bfloat16"))
    assert (f"resuming from step 2 of {tmp_path}, --dtype bfloat16 (was float32), --weight-decay 0.1 (was 0.0), "
            f"--max-grad-norm 0.5 (was 1.0)\n") in capsys.readouterr().out
    run = json.loads((tmp_path / "args.json").read_text())
    assert (run["max_grad_norm"], run["weight_decay"], run["dtype"]) == (0.5, 0.1, "bfloat16")
    assert run["changes"] == [{"step": 2, "dtype": ["float32", "bfloat16"], "weight_decay": [0.0, 0.1],
                               "max_grad_norm": [1.0, 0.5]}]
    [group] = torch.load(tmp_path / "checkpoint-3" / "state.pt")["optimizer"]["param_groups"]
    assert group["weight_decay"] == 0.1 and group["initial_lr"] == 1e-5


def test_a_diverging_run_ends_in_one_line_whose_advice_runs_to_the_end(saved, tmp_path):
    """The issue's run: --lr 1e6 without warm-up; step 1's update is finite, so checkpoint-1 holds weights whose logits
    are NaN, met by step 2's rollout. One line, exit code 1, no traceback from the sampler; it says to start again with a
    lower --lr (resuming checkpoint-1 would meet the same logits), and that command runs to the end."""
    out = tmp_path / "run"
    flags = cli_args(saved, out, "--method", "on_policy", "--lr", "1e6", "--warmup-ratio", "0", "--save-every", "1",
                     "--max-steps", "3")
    result = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=300)
    stderr = result.stderr.strip()
    assert result.returncode == 1 and "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr[-3000:]
    assert re.match(r"error: step 2: the student's logits are NaN or inf at completion step \d+; \S*checkpoint-1 holds "
                    r"those weights: start again with a lower --lr: ", stderr), stderr
    flags = advised(stderr)
    assert "--overwrite" in flags and flags[flags.index("--lr") + 1] == "1e-05"
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and max(r["step"] for r in logged(out)) == 3, done.stderr[-3000:]


def test_non_finite_logits_in_an_evaluation_stop_the_run_with_the_command_that_goes_on(saved, tmp_path, monkeypatch):
    """The evaluation after step 2 meets non-finite logits (the weights of step 2's update): checkpoint-1 passed a whole
    step since, so the line says to continue from it with a lower --lr, and that command runs to the end."""
    evaluate = A.evaluate

    def diverged(*args, **kwargs):
        if len(args) == 6:  # the evaluations during training (those before it name themselves)
            raise FloatingPointError("the student's logits are NaN or inf at completion step 3")
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(A, "evaluate", diverged)
    with pytest.raises(A.UsageError, match=r"^step 2: the student's logits are NaN or inf at completion step 3; continue "
                                           r"from \S*checkpoint-1 with a lower --lr: ") as stopped:
        A.main(cli_args(saved, tmp_path, "--max-steps", "3", "--save-every", "1", "--eval-every", "2"))
    monkeypatch.undo()
    A.main(advised(str(stopped.value)))
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("flag", ["--output-dir", "--toy-dir"])
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_a_folder_that_cannot_be_written_is_one_line_before_any_model_loads(tmp_path, monkeypatch, flag, where):
    """Each folder a run writes in (the toy run: both) is checked when the run starts: a path under a regular file,
    or in /proc (where root cannot write either), is one line naming the flag, before any model loads or trains."""
    (tmp_path / "file").write_text("")
    folder = str(tmp_path / "file" / "run") if where == "under-a-file" else "/proc/nope/run"

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded")
    monkeypatch.setattr(A, "from_pretrained", loaded)
    monkeypatch.setattr(A, "prepare_toy", loaded)
    monkeypatch.chdir(tmp_path)
    reason = r"\S*file is a file, not a folder" if where == "under-a-file" else r"cannot write in /proc \("
    with pytest.raises(A.UsageError, match=rf"^{flag} {re.escape(folder)}: {reason}"):
        A.main([flag, folder])


@pytest.mark.parametrize("failure", ["disk full, writing the weights", "permission, writing state.pt"])
def test_a_save_that_fails_mid_run_is_one_line_naming_the_last_whole_checkpoint(saved, tmp_path, monkeypatch, failure):
    """Checkpoint-3's save fails (a full disk: safetensors' own error; no permission: an OSError from torch.save): one
    line naming checkpoint-2, which stays whole, with the command that continues; checkpoint-3's partial folder is
    removed (the space it took is what a full disk needs), and the command runs to the end."""
    from safetensors import SafetensorError
    import transformers.modeling_utils
    write_weights, save = transformers.modeling_utils.safe_save_file, torch.save

    def full(tensors, path, *args, **kwargs):
        if "checkpoint-3" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return write_weights(tensors, path, *args, **kwargs)

    def denied(obj, path, *args, **kwargs):
        if "checkpoint-3" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(*(transformers.modeling_utils, "safe_save_file", full) if failure.startswith("disk") else
                        (torch, "save", denied))
    reason = "No space left on device" if failure.startswith("disk") else "Permission denied"
    with pytest.raises(A.UsageError, match=rf"^cannot save \S*checkpoint-3: .*{reason}.*; "
                                           rf"{re.escape(str(tmp_path / 'checkpoint-2'))} is whole: ") as stopped:
        A.main(cli_args(saved, tmp_path, "--max-steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert torch.load(tmp_path / "checkpoint-2" / "state.pt")["step"] == 2
    A.main(advised(str(stopped.value)))
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3, 4]


def test_a_users_copy_of_a_checkpoint_is_left_alone(saved, tmp_path, monkeypatch):
    """A user's checkpoint-best/ holding a whole checkpoint (student/ and state.pt, copied from step 2 of another run)
    is not one of the program's: a new run neither refuses it as a run nor deletes it, a resumed run continues from
    its own checkpoint-2, not from it, and --overwrite deletes the run's files but not it."""
    A.main(cli_args(saved, tmp_path / "other", "--max-steps", "2", "--save-every", "2"))
    run, best = tmp_path / "run", tmp_path / "run" / "checkpoint-best"
    shutil.copytree(tmp_path / "other" / "checkpoint-2", best)
    with open(best / "state.pt", "r+b") as f:  # whole, and marked: resuming from it would start after step 7
        state = torch.load(f)
        f.seek(0)
        torch.save({**state, "step": 7}, f)
    kept = {p.relative_to(best): p.read_bytes() for p in best.rglob("*") if p.is_file()}
    with monkeypatch.context() as patched:
        interrupt_at(patched, 3)  # after checkpoint-2
        with pytest.raises(KeyboardInterrupt):
            A.main(cli_args(saved, run, "--max-steps", "4", "--save-every", "2"))
    A.main(cli_args(saved, run, "--max-steps", "4", "--save-every", "2", "--resume"))
    assert [r["step"] for r in logged(run)] == [1, 2, 3, 4]
    A.main(cli_args(saved, run, "--max-steps", "2", "--save-every", "2", "--overwrite"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-best"]
    assert {p.relative_to(best): p.read_bytes() for p in best.rglob("*") if p.is_file()} == kept


def test_nan_weights_are_refused_at_load(saved, tmp_path):
    """A checkpoint with NaN weights is one line before anything runs, not a crash inside sampling."""
    model = AutoModelForCausalLM.from_pretrained(saved / "student")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    model.save_pretrained(tmp_path / "broken")
    A.char_tokenizer().save_pretrained(tmp_path / "broken")
    with pytest.raises(A.UsageError, match=r"broken has NaN or inf weights"):
        A.main([*cli_args(saved, tmp_path / "out"), "--student", str(tmp_path / "broken")])


def test_overwrite_replaces_the_run_and_a_default_folder_is_new(saved, tmp_path, monkeypatch):
    """--overwrite deletes the earlier run's files (not other files); without --output-dir each run gets its own."""
    A.main(cli_args(saved, tmp_path, "--max-steps", "3", "--save-every", "3"))
    (tmp_path / "notes.txt").write_text("mine")
    A.main(cli_args(saved, tmp_path, "--max-steps", "2", "--overwrite"))
    assert [r["step"] for r in logged(tmp_path)] == [1, 2] and (tmp_path / "notes.txt").exists()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.chdir(tmp_path)
    first, second = (A.parse_args(["--seed", "7"]).output_dir for _ in range(2))
    assert first.startswith("runs/adaswitch-toy-7-")
    monkeypatch.setattr(A.time, "strftime", lambda fmt: "20261202-150000")
    assert A.parse_args(["--method", "sft"]).output_dir == "runs/sft-toy-0-20261202-150000"


def test_teacher_hidden_states_are_freed_before_the_next_micro_batch(teacher, monkeypatch):
    """With --grad-accum 3, when a micro-batch's rollout starts, no earlier micro-batch's [B, N, H] teacher hidden
    states are alive: memory does not grow with --grad-accum."""
    import weakref
    student = tiny_gpt2(V, seed=0)
    alive_at_start, kept = [], []
    make = A.make_sequences

    def watched(*args, **kwargs):
        alive_at_start.append(sum(ref() is not None for ref in kept))
        seq = make(*args, **kwargs)
        kept.append(weakref.ref(seq.teacher_hidden))
        return seq
    monkeypatch.setattr(A, "make_sequences", watched)
    gen = torch.Generator().manual_seed(0)
    examples = [{"prompt": torch.randint(3, V, (4,), generator=gen).tolist(), "response": [3], "reference": ""}
                for _ in range(6)]
    args = A.parse_args(["--method", "adaswitch", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "3",
                         "--max-new-tokens", "4"])
    A.train(student, teacher, A.batch_stream(examples, 2, PAD, "cpu", seed=0), args, A.char_tokenizer(), [EOS])
    assert len(alive_at_start) == 6 and alive_at_start == [0] * 6


def test_gradients_are_cleared_between_steps(teacher, monkeypatch):
    """Step 2's gradient (lr 0: the weights stay) equals the gradient of a run that starts at step 2's batch: nothing
    of step 1's gradient is left in it."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=EOS, pad_token_id=PAD)
    start = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    examples = [{"prompt": torch.randint(3, V, (3,), generator=gen).tolist(),
                 "response": torch.randint(3, V, (4,), generator=gen).tolist(), "reference": ""} for _ in range(4)]
    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def record(parameters, *args, **kwargs):
        parameters = list(parameters)
        grads.append(torch.cat([p.grad.flatten() for p in parameters]))
        return clip(parameters, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    args = dataclasses.replace(A.parse_args(["--method", "sft", "--batch-size", "2"]), lr=0.0)
    A.train(copy.deepcopy(start), None, A.batch_stream(examples, 2, PAD, "cpu"), dataclasses.replace(args, max_steps=2),
            A.char_tokenizer(), [EOS])
    A.train(copy.deepcopy(start), None, A.batch_stream(examples[2:], 2, PAD, "cpu"),
            dataclasses.replace(args, max_steps=1), A.char_tokenizer(), [EOS])
    assert len(grads) == 3 and not torch.allclose(grads[0], grads[2])
    assert torch.allclose(grads[1], grads[2], atol=1e-7)


def test_a_local_file_holds_out_the_same_rows_whatever_the_seed(saved):
    """The held-out rows of one local file depend on the file alone, not on --seed."""
    splits = [A.load_rows(A.parse_args(cli_args(saved, saved / "unused", "--seed", seed))) for seed in ("0", "1", "2")]
    assert splits[0][1] == splits[1][1] == splits[2][1] and len(splits[0][1]) == 4


@pytest.mark.parametrize("task", ["toy", "toy_summary"])
def test_no_test_prompt_is_in_the_toy_training_data(task):
    """Whatever --eval-samples (here 3000, beyond the old 500-prompt exclusion), test prompts are never trained on, and
    the training rows (hence the cached toy models) do not depend on it."""
    train, test = A.toy_rows(task, 3, 3000)
    assert len(test) == 3000 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert A.toy_rows(task, 3, 10) == (train, test[:10])


# ----------------------------------------------------------------------------------------------------
# Every run ends well: short runs with the default intervals, summaries over every step, no repeated work, nothing
# half-written taken for done, a hold-out that ignores --eval-samples (issue 18).

REPORT = [("teacher", "teacher", ".3f"), ("student", "student_before", ".3f"), ("->", "student_after", ".3f"),
          ("loss", "loss", ".4f"), ("divergence", "divergence", ".4f"), ("completion", "completion_len", ".1f"),
          ("switch rate", "switch_rate", ".2f"), ("switch step", "switch_pos", ".1f"),
          ("teacher tokens", "teacher_frac", ".2f")]


def short_run(saved: Path, out: Path, method: str, steps: int) -> list[str]:
    """The README's command shape on the saved pair, with the default --log-every, --eval-every and --save-every."""
    return ["--teacher", str(saved / "teacher"), "--student", str(saved / "student"), "--dataset",
            str(saved / "data.jsonl"), "--prompt-field", "question", "--response-field", "answer", "--method", method,
            "--max-steps", str(steps), "--batch-size", "4", "--max-new-tokens", "8", "--eval-samples", "2",
            "--skd-top-k", "3", "--output-dir", str(out), "--max-prompt-len", "48"]


def check_the_end(out: Path, printed: str, method: str, steps: int):
    """The report prints what summary.json holds (n/a where a statistic has no value), the last step is logged with
    the final score, one checkpoint is kept, and saving printed no progress bars."""
    assert "Writing model shards" not in printed
    summary = json.loads((out / "summary.json").read_text())
    report = printed[printed.index(f"{method} on "):]
    for label, key, form in REPORT:
        shown = "n/a" if summary[key] is None else format(summary[key], form)
        assert re.search(rf"(^|\s){re.escape(label)}\s+{re.escape(shown)}(\s|$)", report, re.M), (label, shown)
    assert summary["loss"] > 0 and summary["completion_len"] > 0 and summary["switch_rate"] is not None
    if method in ("sft", "supervised_kd", "off_policy", "on_policy"):  # both models never ran on one prefix
        assert summary["divergence"] is None and re.search(r"divergence\s+n/a", report)
    records = logged(out)
    assert [r["step"] for r in records] == ([10, 11] if steps == 11 else [steps])
    assert records[-1]["eval_score"] == summary["student_after"]  # the final evaluation, once
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{steps}"]


@pytest.mark.parametrize("method", METHODS)
def test_runs_past_log_every_end_with_a_summary_and_a_report_through_the_cli(saved, tmp_path, method):
    """11 steps with the default intervals (one past --log-every 10, fewer than --save-every 100, --eval-every 0):
    exit code 0, no traceback, the report and summary.json agree."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(SCRIPT), *short_run(saved, out, method, 11)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    check_the_end(out, result.stdout + result.stderr, method, 11)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_runs_shorter_than_every_interval_end_with_a_summary_and_a_report(saved, tmp_path, capfd, method, steps):
    """1 and 2 steps, fewer than each default interval (no line logged before the last step): main() ends with the
    report and summary.json agreeing, as the CLI above (in process, to keep the suite's time)."""
    A.main(short_run(saved, tmp_path / "run", method, steps))
    printed = capfd.readouterr()
    check_the_end(tmp_path / "run", printed.out + printed.err, method, steps)


def test_the_summary_is_over_every_step_whatever_the_logging(saved, tmp_path):
    """The summary's statistics weigh every step trained (rows, switched rows, completion tokens, measured steps), so
    --log-every 1 and --log-every 10 give the same summary, which the per-step records of the first reproduce."""
    flags = ["--method", "adaswitch", "--max-steps", "6", "--max-new-tokens", "12", "--k", "1.0"]
    every = A.main(cli_args(saved, tmp_path / "every", *flags))
    sparse = A.main(cli_args(saved, tmp_path / "sparse", *flags, "--log-every", "10"))
    timing = ("train_seconds", "seconds_per_step", "total_seconds", "args")
    assert {k: v for k, v in every.items() if k not in timing} == {k: v for k, v in sparse.items() if k not in timing}
    assert [r["step"] for r in logged(tmp_path / "sparse")] == [6]
    records = logged(tmp_path / "every")
    assert len({r["loss"] for r in records}) == 6 and len({r["teacher_frac"] for r in records}) > 1  # teeth
    rows = 4  # --batch-size: every step trains as many rows
    switched = [r["switch_rate"] * rows for r in records]
    tokens = [r["completion_len"] * rows for r in records]
    expected = {"loss": sum(r["loss"] for r in records) / 6, "switch_rate": sum(switched) / (6 * rows),
                "completion_len": sum(tokens) / (6 * rows),
                "teacher_frac": sum(r["teacher_frac"] * t for r, t in zip(records, tokens)) / sum(tokens),
                "switch_pos": sum((r["switch_pos"] or 0) * n for r, n in zip(records, switched)) / sum(switched)}
    assert sum(switched) > 0
    assert {key: every[key] for key in expected} == pytest.approx(expected, rel=1e-9)


def test_statistics_count_switched_rows_and_completion_tokens_only():
    """switch_pos averages the rows that switched (not the -1 of the others); teacher_frac counts completion tokens, not
    the padding after EOS; each statistic is a (sum, count) pair that steps add up."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    from_teacher = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    measured = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    d = torch.tensor([[0.5, 1.5, 0, 0], [0.0, 1.0, 1.0, 2.0], [0.5, 0.5, 0, 0]]) * measured
    seq = A.Rollout(sequences=torch.zeros(3, 6, dtype=torch.long), attention_mask=torch.ones(3, 6),
                    completion_mask=mask, from_teacher=from_teacher, switch_step=torch.tensor([1, 3, -1]),
                    divergences=d, measured=measured)
    stats = A.sequence_stats([seq])
    assert stats == {"switch_rate": (2.0, 3), "switch_pos": (4.0, 2), "teacher_frac": (3.0, 9),
                     "divergence": (7.0, 8), "completion_len": (9, 3)}
    assert A.ratio(*stats["switch_pos"]) == 2.0 and A.ratio(*stats["teacher_frac"]) == 3 / 9
    assert A.ratio(0.0, 0) is None


def test_each_step_draws_its_own_samples(saved, monkeypatch):
    """The same batch and unchanged weights (lr 0) at steps 1 and 2: the rollouts differ, since each step seeds its own
    draws from (seed, step); a second run draws the same again."""
    tokenizer = A.char_tokenizer()
    args = dataclasses.replace(A.parse_args(["--method", "on_policy", "--max-steps", "2", "--max-new-tokens", "8"]),
                               lr=0.0)
    examples = A.encode([{"prompt": f"{i}+{i}=", "response": "0"} for i in range(4)], tokenizer, args)
    batch = next(A.batch_stream(examples, 4, tokenizer.pad_token_id, "cpu"))
    drawn, make = [], A.make_sequences

    def kept(*args, **kwargs):
        drawn.append(make(*args, **kwargs))
        return drawn[-1]
    monkeypatch.setattr(A, "make_sequences", kept)
    for _ in range(2):
        student = AutoModelForCausalLM.from_pretrained(saved / "student")
        A.train(student, None, itertools.repeat(batch), args, tokenizer, [tokenizer.eos_token_id])
    step_1, step_2, again_1, again_2 = (seq.sequences for seq in drawn)
    assert not torch.equal(step_1, step_2) and torch.equal(step_1, again_1) and torch.equal(step_2, again_2)


def test_evaluation_decodes_greedily_whatever_the_random_state(saved, monkeypatch):
    """evaluate() scores the greedy completions, those of HF generate(do_sample=False), under any torch seed."""
    tokenizer, texts = A.char_tokenizer(), []
    model = AutoModelForCausalLM.from_pretrained(saved / "student").eval()
    args = A.parse_args(["--max-new-tokens", "6"])
    examples = A.encode([{"prompt": f"{i}+{i + 3}=", "response": "0"} for i in range(4)], tokenizer, args)
    batch = next(A.batch_stream(examples, 4, tokenizer.pad_token_id, "cpu"))
    monkeypatch.setitem(A.SCORES, "exact", lambda prediction, reference: texts.append(prediction) or 0.0)
    for seed in (0, 1):
        torch.manual_seed(seed)
        A.evaluate(model, tokenizer, [batch], args, "exact", [tokenizer.eos_token_id])
    greedy = model.generate(batch["prompt_ids"], attention_mask=batch["prompt_mask"], do_sample=False,
                            max_new_tokens=6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    prompt_len = batch["prompt_ids"].shape[1]
    assert texts == tokenizer.batch_decode(greedy[:, prompt_len:], skip_special_tokens=True) * 2


def test_a_run_killed_while_saving_resumes_from_its_newest_whole_checkpoint(saved, tmp_path, monkeypatch):
    """With --grad-accum 2 and a checkpoint every step, killed while writing checkpoint-10's state.pt (checkpoint-9
    stays whole, checkpoint-10 has none), or after its rename but before checkpoint-9 is deleted (two whole ones, taken
    by step: 10 after 9): --resume trains only the steps after the newest whole one and ends as the run never killed."""
    flags = ["--method", "adaswitch", "--grad-accum", "2", "--max-steps", "11", "--save-every", "1",
             "--eval-every", "0"]
    A.main(cli_args(saved, tmp_path / "whole", *flags))
    save, rmtree, stats = torch.save, shutil.rmtree, A.sequence_stats

    def killed_writing_state(obj, path, *args, **kwargs):
        if Path(path).parent.name != "checkpoint-10":
            return save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"the first bytes of a state")
        raise KeyboardInterrupt

    def killed_before_cleanup(path, *args, **kwargs):
        if Path(path).name == "checkpoint-9":
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)
    for name, patch, whole, trained in (("state", (torch, "save", killed_writing_state), [9], [10, 11]),
                                        ("cleanup", (shutil, "rmtree", killed_before_cleanup), [9, 10], [11])):
        out = tmp_path / name
        with monkeypatch.context() as patched:
            patched.setattr(*patch)
            with pytest.raises(KeyboardInterrupt):
                A.main(cli_args(saved, out, *flags))
        assert sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/state.pt")) == whole
        steps = []
        with monkeypatch.context() as patched:
            patched.setattr(A, "sequence_stats", lambda seqs: steps.append(1) or stats(seqs))
            A.main(cli_args(saved, out, *flags, "--resume"))
        assert len(steps) == len(trained), name
        same_run(tmp_path / "whole", out)
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-11"]


def test_only_checkpoints_the_program_wrote_are_deleted(saved, tmp_path):
    """A user's checkpoint-best/ folder, an empty checkpoint-7/ and a checkpoint-3.txt file in --output-dir are not
    the program's checkpoints: a run there neither refuses them as an earlier run nor deletes them."""
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-best" / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-3.txt").write_text("mine")
    A.main(cli_args(saved, tmp_path, "--max-steps", "2", "--save-every", "1"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3.txt",
                                                                     "checkpoint-7", "checkpoint-best"]
    assert (tmp_path / "checkpoint-best" / "notes.txt").read_text() == "mine"


def test_a_toy_model_killed_while_saving_is_not_taken_for_cached(tmp_path, monkeypatch, capsys):
    """A toy model whose save was killed (its weights written, its tokenizer not) leaves no folder under its cached
    name, so the next run trains it again; saves print no transformers progress bars."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()  # as in a fresh process (main() turns them off)
    args = A.parse_args(["--toy-teacher-steps", "1", "--toy-student-steps", "1", "--toy-dir", str(tmp_path)])
    save = PreTrainedTokenizerFast.save_pretrained

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        A.prepare_toy(args, "cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["toy-3digits-teacher-1steps.partial"]
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", save)
    capsys.readouterr()
    toy = A.prepare_toy(args, "cpu")
    printed = capsys.readouterr()
    assert "toy teacher: 1 SFT steps" in printed.out and "Writing" not in printed.err + printed.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-3digits-student-1steps", "toy-3digits-teacher-1steps"]
    assert len(AutoTokenizer.from_pretrained(toy.teacher)) == len(A.char_tokenizer())
    assert AutoModelForCausalLM.from_pretrained(toy.student).config.n_layer == 2


def test_a_local_file_holds_out_the_same_rows_whatever_eval_samples(saved):
    """A fixed tenth of a local file is held out: --eval-samples picks how many of those rows are scored, and the
    training rows stay the same, so runs with other --eval-samples never train on what another tests on."""
    splits = [A.load_rows(A.parse_args(cli_args(saved, saved / "unused", "--eval-samples", n)))
              for n in ("2", "4", "100")]
    assert splits[0][0] == splits[1][0] == splits[2][0] and len(splits[0][0]) == 36
    assert splits[0][1] == splits[1][1][:2] and splits[1][1] == splits[2][1]


def test_each_evaluation_runs_once(saved, tmp_path, monkeypatch):
    """A run scores the teacher and the student once before training and the student once at each --eval-every step;
    --eval-every equal to --max-steps evaluates the last step once, not again as the final evaluation."""
    evaluated, evaluate = [], A.evaluate
    monkeypatch.setattr(A, "evaluate", lambda *a, **k: evaluated.append(a[6] if len(a) > 6 else "eval") or evaluate(*a))
    A.main(cli_args(saved, tmp_path / "run", "--eval-every", "2"))
    assert evaluated == ["eval teacher", "eval student", "eval"]
    evaluated.clear()
    A.main(cli_args(saved, tmp_path / "run", "--eval-every", "1", "--overwrite"))
    assert evaluated == ["eval teacher", "eval student", "eval", "eval"]
