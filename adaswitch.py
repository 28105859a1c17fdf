"""AdaSwitch: token-level adaptive switching between on- and off-policy knowledge distillation.

The student writes each sequence until its next-token distribution drifts too far from the teacher's
(d_i > k * mean of the last `window` divergences); from that step on the teacher writes the rest. The
student is then trained to match the teacher on every token of the mixed sequence.
Paper: "AdaSwitch: Adaptive Switching Generation for Knowledge Distillation", arXiv 2510.07842.

    python adaswitch.py                                        # offline default: toy task, tiny models
    python adaswitch.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k
    python -m pytest -q test_adaswitch.py                      # the tests
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

# ----------------------------------------------------------------------------------------------------
# Divergences: d(p_t || p_s) per position, reduced over the vocabulary.
# Shapes: B batch, P prompt length, N new tokens, V vocabulary.

METRICS = ("fkl", "rkl", "jsd", "tvd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim. Ids with p = 0 add 0, also where q = 0 (-inf logits), instead of NaN."""
    return (log_p.exp() * (log_p - log_q).masked_fill(log_p == -math.inf, 0.0)).sum(-1)


def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, metric: str = "fkl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Divergence between softmax(teacher_logits / T) and softmax(student_logits / T): [..., V] -> [...].

    fkl = KL(p_t || p_s), rkl = KL(p_s || p_t), tvd = 0.5 * sum |p_t - p_s|, and jsd is the generalized
    JSD of GKD: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown divergence metric {metric!r}; choose one of {', '.join(METRICS)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    # float32 always: in bf16 the JSD's small differences of large terms come out negative.
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [..., V]
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [..., V]
    if metric == "fkl":
        return _kl(log_p_t, log_p_s)
    if metric == "rkl":
        return _kl(log_p_s, log_p_t)
    if metric == "tvd":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; beta = 0 or 1 is a plain KL: use metric fkl or rkl")
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log(1.0 - beta))  # [..., V], log of the mixture
    return beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)


# ----------------------------------------------------------------------------------------------------
# Switch tracker: the paper's rule, one state per row. Row b switches at step i when
#     d_i > tau_i = k * mean(d_{i-window}, ..., d_{i-1})      (the current d_i is not in the mean)


class SwitchTracker:
    """Sliding-window switch rule for a batch of B rows; call `update` once per decoding step.

    `min_history` (default `window`) is how many divergences a row must have recorded before it may switch.
    The paper is silent on this warm-up; we wait for a full window, so an early spike cannot end exploration
    before there is an average to compare with. With fewer than `window` recorded, tau uses their mean.
    """

    def __init__(self, batch_size: int, window: int, k: float, device=None, min_history: int | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1 (the number of past divergences averaged), got {window}")
        if not k >= 0:
            raise ValueError(f"k must be >= 0 (the threshold is k times the moving average), got {k}")
        self.window, self.k = window, float(k)
        self.min_history = window if min_history is None else min_history
        if not 1 <= self.min_history <= window:
            raise ValueError(f"min_history must be in [1, window={window}], got {min_history}")
        self.history = torch.zeros(batch_size, window, device=device)          # [B, window] ring buffer
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] divergences recorded
        self.switched = torch.zeros(batch_size, dtype=torch.bool, device=device)                # [B]
        self.switch_step = torch.full((batch_size,), -1, dtype=torch.long, device=device)       # [B]
        self.step = 0  # 0-based completion index of the next update

    def update(self, d: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed this step's divergences d [B]; returns the rows that switch at this step [B] bool."""
        d = d.float().to(self.history.device)
        live = ~self.switched if active is None else active.to(self.switched.device) & ~self.switched  # [B]
        filled = self.count.clamp(max=self.window)                                                        # [B]
        tau = self.k * self.history.sum(-1) / filled.clamp(min=1)                                        # [B]
        # k = inf and an all-zero history give tau = nan, and d > nan is False: no switch, as intended.
        fire = live & (filled >= self.min_history) & (d > tau)                                           # [B]
        record = live & ~fire                                                                             # [B]
        slot = (self.count % self.window).unsqueeze(-1)                                                   # [B, 1]
        old = self.history.gather(-1, slot).squeeze(-1)                                                   # [B]
        self.history.scatter_(-1, slot, torch.where(record, d, old).unsqueeze(-1))
        self.count += record.long()
        self.switched |= fire
        self.switch_step = torch.where(fire, self.step, self.switch_step)
        self.step += 1
        return fire


# ----------------------------------------------------------------------------------------------------
# Rollout: one batched, KV-cached decoding loop for the four ways of writing a completion.
#   student   the student writes every token                              (on-policy KD, GKD)
#   teacher   the teacher writes every token                              (off-policy KD)
#   skd       the student writes; tokens outside the teacher's top-k are resampled by the teacher (SKD)
#   adaswitch the student writes until its row's tracker fires, the teacher writes from there on

MODES = ("student", "teacher", "skd", "adaswitch")


@dataclass
class Rollout:
    sequences: torch.Tensor            # [B, P+N] the left-padded prompt as given, then the completion (pad after EOS)
    attention_mask: torch.Tensor       # [B, P+N] prompt mask, then completion_mask
    completion_mask: torch.Tensor      # [B, N]   generated tokens up to and including EOS
    from_teacher: torch.Tensor         # [B, N]   bool, the token was written by the teacher
    switch_step: torch.Tensor          # [B]      completion index of the switch; -1 none, 0 for mode teacher
    divergences: torch.Tensor          # [B, N]   d_i where both models ran for the row, 0 elsewhere
    teacher_logits: torch.Tensor | None = None  # [B, N, V] when the teacher ran at every step


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def sample(logits: torch.Tensor, temperature: float = 1.0, do_sample: bool = True, generator=None) -> torch.Tensor:
    """Plain temperature sampling, or argmax when do_sample is False: [B, V] -> [B]."""
    if not do_sample:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)                          # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def rollout(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str, *,
            max_new_tokens: int, window: int = 8, k: float = 1.5, skd_top_k: int = 25, metric: str = "fkl",
            temperature: float = 1.0, do_sample: bool = True, eos_token_id: int | list[int] | None = None,
            pad_token_id: int = 0, generator: torch.Generator | None = None, min_history: int | None = None,
            teacher_writes_switch_token: bool = True) -> Rollout:
    """Write a completion for every left-padded prompt in input_ids [B, P]; see MODES.

    Both models keep a KV cache and see only the new token at each step. Logits are compared and sampled
    over the shared first min(V_student, V_teacher) ids (padded embedding tables within one family).
    """
    if mode not in MODES:
        raise ValueError(f"unknown rollout mode {mode!r}; choose one of {', '.join(MODES)}")
    models = {"student": student, "teacher": teacher}
    needed = ["student"] if mode == "student" else ["teacher"] if mode == "teacher" else ["student", "teacher"]
    if any(models[name] is None for name in needed):
        raise ValueError(f"mode {mode!r} needs both a student and a teacher model")
    vocab = min(vocab_size(models[name]) for name in needed)
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=input_ids.device).flatten()
    batch, device = input_ids.shape[0], input_ids.device
    tracker = (SwitchTracker(batch, window, k, device, min_history) if mode == "adaswitch" else None)
    caches = {name: DynamicCache(config=models[name].config) for name in needed}
    was_training = {name: models[name].training for name in needed}
    for name in needed:
        models[name].eval()

    ids, mask = input_ids, attention_mask                                             # [B, P], [B, P]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)                   # [B, P] left padding aware
    done = torch.zeros(batch, dtype=torch.bool, device=device)                        # [B] row has written EOS
    no_rows = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, from_teacher, written, divergences, teacher_logits = [], [], [], [], []
    try:
        for _ in range(max_new_tokens):
            active = ~done                                                             # [B]
            # Once every unfinished row has switched, the student's opinion is no longer needed.
            run_student = "student" in needed and not (tracker is not None and not (active & ~tracker.switched).any())
            logits = {}
            for name in needed:
                if name == "student" and not run_student:
                    continue
                out = models[name](input_ids=ids, attention_mask=mask, position_ids=positions,
                                   cache=caches[name], use_cache=True, logits_to_keep=1)
                logits[name] = out.logits[:, -1, :vocab]                               # [B, V]
            s_logits, t_logits = logits.get("student"), logits.get("teacher")
            s_token = None if s_logits is None else sample(s_logits, temperature, do_sample, generator)  # [B]
            t_token = None if t_logits is None else sample(t_logits, temperature, do_sample, generator)  # [B]
            d = torch.zeros(batch, device=device)                                      # [B]
            measured = no_rows
            if s_logits is not None and t_logits is not None:
                d = divergence(t_logits, s_logits, metric, temperature=temperature)
                measured = active if tracker is None else active & ~tracker.switched

            if mode == "student":
                by_teacher = no_rows
            elif mode == "teacher":
                by_teacher = active
            elif mode == "skd":
                top = t_logits.topk(min(skd_top_k, vocab), dim=-1).indices              # [B, top_k]
                by_teacher = (top != s_token.unsqueeze(-1)).all(-1)                    # [B] not in the teacher's top-k
            else:
                before = tracker.switched.clone()
                tracker.update(d, active)
                # Who writes the switch token is not in the paper: by default the teacher, since the
                # student's distribution at that step is the one just judged too far from the teacher's.
                by_teacher = tracker.switched if teacher_writes_switch_token else before

            token = t_token if s_token is None else s_token if t_token is None else torch.where(by_teacher, t_token, s_token)
            token = torch.where(active, token, pad_token_id)                           # [B] pad after EOS
            tokens.append(token)
            from_teacher.append(by_teacher & active)
            written.append(active)
            divergences.append(torch.where(measured, d, 0.0))
            if t_logits is not None:
                teacher_logits.append(t_logits)
            done = done | (active & torch.isin(token, eos))
            if done.all():
                break
            ids = token.unsqueeze(-1)                                                  # [B, 1]
            mask = torch.cat([mask, active.unsqueeze(-1).to(mask.dtype)], dim=-1)     # [B, P+i+1]
            positions = positions[:, -1:] + 1                                          # [B, 1]
    finally:
        for name in needed:
            models[name].train(was_training[name])

    completion = torch.stack(tokens, dim=1)                                            # [B, N]
    completion_mask = torch.stack(written, dim=1).long()                               # [B, N]
    if tracker is not None:
        switch_step = tracker.switch_step
    else:
        switch_step = torch.full((batch,), 0 if mode == "teacher" else -1, dtype=torch.long, device=device)
    return Rollout(
        sequences=torch.cat([input_ids, completion], dim=1),                           # [B, P+N]
        attention_mask=torch.cat([attention_mask.long(), completion_mask], dim=1),     # [B, P+N]
        completion_mask=completion_mask,
        from_teacher=torch.stack(from_teacher, dim=1),                                 # [B, N]
        switch_step=switch_step,
        divergences=torch.stack(divergences, dim=1),                                   # [B, N]
        teacher_logits=torch.stack(teacher_logits, dim=1) if len(teacher_logits) == len(tokens) else None,
    )


# ----------------------------------------------------------------------------------------------------
# Losses: a token-level divergence between student and (detached) teacher, on completion tokens only.


def completion_logits(logits: torch.Tensor, num_new: int) -> torch.Tensor:
    """The logits that predict the last num_new tokens: the logit at position t predicts token t+1.

    [B, P+N, V] (or the last N+1 positions only, as `logits_to_keep=N+1` returns) -> [B, N, V].
    """
    return logits[:, -num_new - 1:-1]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 metric: str = "fkl", beta: float = 0.5, temperature: float = 1.0,
                 num_tokens: float | None = None) -> torch.Tensor:
    """Mean divergence over positions where mask [B, N] is 1; gradients reach the student only.

    num_tokens replaces mask.sum() as the divisor, so gradient accumulation can normalize by the
    valid tokens of the whole accumulation window.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    d = divergence(teacher_logits[..., :vocab].detach(), student_logits[..., :vocab], metric, beta, temperature)  # [B, N]
    keep = mask.bool()
    total = torch.where(keep, d, 0.0).sum()  # where, not d * mask: inf * 0 at a masked position would be NaN
    return total / (keep.sum().clamp(min=1) if num_tokens is None else num_tokens)
