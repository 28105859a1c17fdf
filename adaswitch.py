"""AdaSwitch: token-level adaptive switching between on- and off-policy knowledge distillation.

The student writes each sequence until its next-token distribution drifts too far from the teacher's (d_i > k *
mean of the last `window` divergences); from that step on the teacher writes the rest. The student is then trained
to match the teacher on every token of the mixed sequence. Paper: Peng et al., "AdaSwitch: Balancing Exploration
and Guidance in Knowledge Distillation via Adaptive Switching", arXiv 2510.07842.

    python adaswitch.py                                        # offline default: toy task, tiny models
    python adaswitch.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k
    python -m pytest -q test_adaswitch.py                      # the tests

The method (divergences, switch tracker, rollout, losses) between the '=' lines uses nothing after them: copy it."""
# ============================================ AdaSwitch: the method ============================================
# Shapes: B batch, P prompt, N new tokens (step i), V vocabulary, H hidden size, S positions of a forward pass, M tokens
# a loss counts, C of them in a chunk; _s student's, _t teacher's. Needs torch and transformers >= 5.24.
import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from transformers import DynamicCache

# --- Divergences: d(p_t || p_s) per position, reduced over the vocabulary.
METRICS = ("fkl", "rkl", "jsd", "tvd")

def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim. Ids with p = 0 add 0, also where q = 0 (-inf logits), instead of NaN."""
    return (log_p.exp() * torch.where(log_p == -math.inf, 0.0, log_p - log_q)).sum(-1)

def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, metric: str = "fkl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """d(p_t || p_s) per position, [..., V] -> [...], of p_t = softmax(teacher_logits / temperature) and p_s likewise.
    fkl = KL(p_t || p_s), rkl = KL(p_s || p_t), tvd = 0.5 * sum |p_t - p_s|, and jsd is the generalized
    JSD of GKD: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s."""
    if metric not in METRICS:
        raise ValueError(f"unknown divergence metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature = {temperature}: logits are divided by it; use a temperature > 0")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(teacher_logits.shape)} != {tuple(student_logits.shape)}")
    # float32: bf16 turns the JSD's small differences of large terms negative. Temperature 1: no division (1/4 of loss).
    t, s = (x.float() if temperature == 1 else x.float() / temperature for x in (teacher_logits, student_logits))
    log_p_t, log_p_s = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)  # [..., V]
    if metric in ("fkl", "rkl"):
        return _kl(log_p_t, log_p_s) if metric == "fkl" else _kl(log_p_s, log_p_t)
    if metric == "tvd":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta = {beta}: jsd needs 0 < beta < 1; beta = 0 or 1 is a plain KL, use fkl or rkl")
    # A finite floor for log 0: logaddexp(-inf, -inf) has a NaN gradient; m > 0 wherever p_t or p_s is.
    log_p_t, log_p_s = (x.clamp(min=torch.finfo(torch.float32).min) for x in (log_p_t, log_p_s))
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log(1.0 - beta))  # [..., V], log of the mixture
    return beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)

# --- Switch tracker: the paper's rule, one state per row. Row b switches at step i when
#     d_i > tau_i = k * mean(d_{i-window}, ..., d_{i-1})      (the current d_i is not in the mean)
class SwitchTracker:
    """Sliding-window switch rule for B rows, `update` once per decoding step. Warm-up, where the paper is silent: a row
    may switch once it has `min_history` divergences (default a full window, against early spikes); tau: their mean."""
    def __init__(self, batch_size: int, window: int, k: float, device=None, min_history: int | None = None):
        if window < 1:
            raise ValueError(f"window = {window}: the moving average needs a divergence; use window >= 1")
        if not k >= 0:
            raise ValueError(f"k = {k}: the threshold is k times a mean divergence; use k >= 0 (inf: never switch)")
        self.window, self.k, self.min_history = window, float(k), window if min_history is None else min_history
        if not 1 <= self.min_history <= window:
            raise ValueError(f"min_history = {min_history}: use a value from 1 to window ({window})")
        self.history = torch.zeros(batch_size, window, device=device)          # [B, window] ring buffer
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] divergences recorded
        self.switched = torch.zeros(batch_size, dtype=torch.bool, device=device)                # [B]
        self.switch_step = torch.full((batch_size,), -1, dtype=torch.long, device=device)       # [B] step that fired
        self.step = 0  # 0-based completion index of the next update

    def update(self, d: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Feed this step's divergences d [B]; returns the rows that switch at this step [B] bool."""
        d = d.float().to(self.history.device)
        live = ~self.switched if active is None else active.to(self.switched.device) & ~self.switched  # [B]
        filled = self.count.clamp(max=self.window)                                                        # [B]
        tau = self.k * self.history.sum(-1) / filled.clamp(min=1)                                        # [B]
        # k = inf never switches, stated here rather than left to inf * 0 = nan and d > nan being False.
        fire = live & (filled >= self.min_history) & (d > tau) & (self.k < math.inf)                     # [B]
        record = live & ~fire                                                                             # [B]
        self.history[record, self.count[record] % self.window] = d[record]  # into each recording row's ring slot
        self.count += record.long()
        self.switched |= fire
        self.switch_step = torch.where(fire, self.step, self.switch_step)
        self.step += 1
        return fire

# --- Logits from hidden states, which the rollout keeps: at V = 150k, [B, N, H] take megabytes, [B, N, V] gigabytes.
def soft_cap(model, logits: torch.Tensor) -> torch.Tensor:
    """Gemma's final soft-capping, cap * tanh(logits / cap), where the model's config has a cap."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap

def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of last hidden states, [..., H] -> [..., V]: the output embedding, then soft-capping."""
    return soft_cap(model, model.get_output_embeddings()(hidden))

def forward(model, check: bool = False, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """model(**inputs).logits [B, 1 or S, V] and the last hidden states [B, S, H] (base_model's output, caught by a
    hook). check: refuse a model whose logits are more than lm_head of those (Cohere's logit_scale; NaN passes)."""
    caught = []
    with model.base_model.register_forward_hook(lambda module, args, out: caught.append(out.last_hidden_state)):
        logits = model(**inputs).logits
    if check and not torch.allclose(lm_head(model, caught[0][:, -logits.shape[1]:]), logits, 1e-3, 1e-4, True):
        raise ValueError(f"{type(model).__name__} computes its logits otherwise than lm_head: not chunk by chunk")
    return logits, caught[0]

# --- Rollout: one batched, KV-cached decoding loop for the four ways of writing a completion.
MODES = ("student",    # the student writes every token                              (on-policy KD, GKD)
         "teacher",    # the teacher writes every token                              (off-policy KD)
         "skd",        # the student writes; tokens outside the teacher's top-k are resampled by the teacher (SKD)
         "adaswitch")  # the student writes until its row's tracker fires, the teacher writes from there on

@dataclass
class Rollout:
    sequences: torch.Tensor            # [B, P+N] the left-padded prompt as given, then the completion (pad after EOS)
    attention_mask: torch.Tensor       # [B, P+N] prompt mask, then completion_mask
    completion_mask: torch.Tensor      # [B, N]   generated tokens up to and including EOS
    from_teacher: torch.Tensor         # [B, N]   bool, the token was written by the teacher
    switch_step: torch.Tensor          # [B]      completion index of the first token the teacher wrote; -1 none
    divergences: torch.Tensor          # [B, N]   d_i where measured, 0 elsewhere
    measured: torch.Tensor             # [B, N]   bool, both models ran for the row (adaswitch: up to the switch)
    teacher_hidden: torch.Tensor | None = None  # [B, N, H] the teacher's last hidden states (all modes but student)

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as Hugging Face's generate computes them: [B, S] -> [B, S]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def sample(logits: torch.Tensor, temperature: float = 1.0, do_sample: bool = True, generator=None) -> torch.Tensor:
    """Plain temperature sampling, or argmax when do_sample is False: [B, V] -> [B]."""
    if not do_sample:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1, generator=generator).squeeze(-1)

@torch.no_grad()
def rollout(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str, *,
            max_new_tokens: int, window: int = 8, k: float = 1.5, skd_top_k: int = 25, switch_metric: str = "fkl",
            switch_beta: float = 0.5, temperature: float = 1.0, do_sample: bool = True,
            eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, generator=None,
            min_history: int | None = None, teacher_writes_switch_token: bool = True) -> Rollout:
    """A completion for every prompt in input_ids [B, P] (see MODES), padded on the left (attention_mask 0 there), by
    two models sharing a tokenizer (ids compare one to one; logits over the shared first min(V_s, V_t) ids), each with
    a KV cache, fed only the new token per step. switch_metric, switch_beta: the divergence d_i of the switch rule and
    its JSD weight. eos_token_id: every id that ends a row (e.g. the models' generation_config.eos_token_id)."""
    if mode not in MODES:
        raise ValueError(f"unknown rollout mode {mode!r}; choose one of {', '.join(MODES)}")
    models = {"student": student, "teacher": teacher}
    needed = ["student"] if mode == "student" else ["teacher"] if mode == "teacher" else ["student", "teacher"]
    if any(models[name] is None for name in needed):
        raise ValueError(f"mode {mode!r} needs both a student and a teacher model")
    vocab = min(m.get_output_embeddings().weight.shape[0] for m in (student, teacher) if m is not None)  # V
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=input_ids.device).flatten()
    batch, device = input_ids.shape[0], input_ids.device
    tracker = SwitchTracker(batch, window, k, device, min_history) if mode == "adaswitch" else None
    was_training = {name: models[name].training for name in needed}  # restored at the end
    caches = {name: DynamicCache(config=models[name].eval().config) for name in needed}  # eval(): no dropout
    ids, mask, positions = input_ids, attention_mask, position_ids(attention_mask)   # [B, P] each
    done = torch.zeros(batch, dtype=torch.bool, device=device)                        # [B] row has written EOS
    columns = {}  # Rollout field -> one column per step, [B] each ([B, H] teacher_hidden), stacked along N at the end
    try:
        for i in range(max_new_tokens):
            active = ~done                                                             # [B]
            exploring = active if tracker is None else active & ~tracker.switched     # [B] unfinished, not switched
            logits = {}  # no student forward once every unfinished row has switched: its opinion is no longer needed
            for name in ["teacher"] if tracker is not None and not exploring.any() else needed:
                out, hidden = forward(models[name], i == 0 and name == "teacher", input_ids=ids, use_cache=True,
                                      attention_mask=mask, position_ids=positions, cache=caches[name], logits_to_keep=1)
                logits[name] = out[:, -1, :vocab]                                       # [B, V]
                if not logits[name].isfinite().all():  # diverged weights or overflow: the sampler would fail on them
                    raise FloatingPointError(f"the {name}'s logits are NaN or inf at completion step {i}")
                if name == "teacher":  # checked at step 0: the loss projects these with lm_head
                    columns.setdefault("teacher_hidden", []).append(hidden[:, -1])     # [B, H]
            s_logits, t_logits = logits.get("student"), logits.get("teacher")
            d, measured = torch.zeros(batch, device=device), torch.zeros_like(done)   # [B], [B] both models ran
            if s_logits is not None and t_logits is not None:
                d, measured = divergence(t_logits, s_logits, switch_metric, switch_beta, temperature), exploring
            s_token, token = None, torch.full((batch,), pad_token_id, dtype=torch.long, device=device)  # [B]
            if mode in ("student", "teacher"):
                teacher_turn = active & (mode == "teacher")
            elif mode == "skd":
                s_token = sample(s_logits, temperature, do_sample, generator)          # [B]
                top = t_logits.topk(min(skd_top_k, vocab), dim=-1).indices              # [B, skd_top_k]
                teacher_turn = (top != s_token.unsqueeze(-1)).all(-1)                  # [B] not in the teacher's top-k
            else:
                fire = tracker.update(d, active)                                       # [B]
                # Not in the paper: the teacher writes the switch token (the student's distribution there is too far).
                teacher_turn = tracker.switched if teacher_writes_switch_token else tracker.switched & ~fire
            # Sample only for rows that use the sample (multinomial over V is the loop's largest cost); pad after EOS.
            from_student, from_teacher = active & ~teacher_turn, active & teacher_turn   # [B], [B]
            if from_student.any():
                s_token = sample(s_logits, temperature, do_sample, generator) if s_token is None else s_token
                token = torch.where(from_student, s_token, token)
            if from_teacher.any():
                token = torch.where(from_teacher, sample(t_logits, temperature, do_sample, generator), token)
            for name, column in dict(sequences=token, completion_mask=active.long(), from_teacher=from_teacher,
                                     divergences=torch.where(measured, d, 0.0), measured=measured).items():
                columns.setdefault(name, []).append(column)  # sequences: the completion; the prompt goes before it
            done = done | (active & torch.isin(token, eos))
            if done.all():
                break
            ids = token.unsqueeze(-1)                                                  # [B, 1]
            mask = torch.cat([mask, active.unsqueeze(-1).to(mask.dtype)], dim=-1)     # [B, P+i+1]
            positions = positions[:, -1:] + 1                                          # [B, 1]
    finally:
        for name in needed:
            models[name].train(was_training[name])
    fields = {name: torch.stack(steps, 1) for name, steps in columns.items()}  # [B, N] each, teacher_hidden [B, N, H]
    fields["sequences"] = torch.cat([input_ids, fields["sequences"]], 1)                         # [B, P+N]
    fields["attention_mask"] = torch.cat([attention_mask.long(), fields["completion_mask"]], 1)  # [B, P+N]
    fields["switch_step"] = torch.where(fields["from_teacher"].any(1), fields["from_teacher"].long().argmax(1), -1)
    return Rollout(**fields)  # no teacher_hidden in mode student: the teacher never ran

# --- Losses: a token-level divergence between student and (detached) teacher, on completion tokens only.
def completion_logits(logits: torch.Tensor, num_new: int) -> torch.Tensor:
    """The positions that predict the last num_new tokens: [B, P+N, ...] or the last N+1 positions -> [B, N, ...]."""
    return logits[:, -num_new - 1:-1]

class ChunkedSum(torch.autograd.Function):
    """loss_fn(F.linear(hidden, weight, bias), targets) for a loss_fn summed over rows, computed chunk_size rows at a
    time, value and gradients alike (test_chunked_loss_and_gradient_equal_the_full_logits_ones). Each chunk's backward
    runs at once into gradients kept in ctx: its logits [C, V] are freed with it, never recomputed (checkpointing)."""
    @staticmethod
    def forward(ctx, loss_fn, chunk_size: int, grad: bool, hidden: torch.Tensor, targets: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None):
        total = hidden.new_zeros((), dtype=torch.float32)
        ctx.grads = [torch.zeros_like(x) for x in (hidden, weight, bias) if x is not None] if grad else []
        for i in range(0, len(hidden), chunk_size):
            h = hidden[i:i + chunk_size]                                                   # [C, H]
            raw = F.linear(h, weight, bias).requires_grad_(grad)                          # [C, V]
            with torch.enable_grad():
                loss = loss_fn(raw, targets[i:i + chunk_size])
            if grad:
                d_raw = torch.autograd.grad(loss, raw)[0].to(weight.dtype)                 # [C, V]
                ctx.grads[0][i:i + chunk_size] = d_raw @ weight
                ctx.grads[1].addmm_(d_raw.T, h.to(weight.dtype))  # in place: autograd would add a [V, H] per chunk
                if bias is not None:
                    ctx.grads[2] += d_raw.sum(0)
            total += loss.detach()
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grads, ctx.grads = ctx.grads, None  # scaled in place and held nowhere else: .grad takes them without a copy
        grad_hidden, grad_weight, *grad_bias = (grad.mul_(grad_total) for grad in grads)
        return None, None, None, grad_hidden, None, grad_weight, *(grad_bias or [None])

def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, metric: str = "fkl",
                 beta: float = 0.5, temperature: float = 1.0, num_tokens: float | None = None) -> torch.Tensor:
    """Divergence between [B, N, V] logits summed where mask [B, N] is 1, over num_tokens (default: mask.sum());
    gradient accumulation passes a whole window's count, so every token weighs the same. Only the student learns."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    d = divergence(teacher_logits[..., :vocab].detach(), student_logits[..., :vocab], metric, beta, temperature)
    keep = mask.bool()  # torch.where, not d * mask: inf * 0 at a masked position is NaN
    return torch.where(keep, d, 0.0).sum() / (keep.sum().clamp(min=1) if num_tokens is None else num_tokens)

def sequence_loss(student, teacher, seq: Rollout, metric: str = "fkl", beta: float = 0.5, temperature: float = 1.0,
                  num_tokens: float | None = None, chunk_size: int = 64) -> torch.Tensor:
    """distill_loss on seq's completion, to the teacher hidden states the rollout kept, else to a teacher forward's;
    teacher None: the tokens' negative log-likelihood (SFT). Logits exist chunk_size tokens at a time, no [B, N, V]."""
    n, keep = seq.completion_mask.shape[1], seq.completion_mask.bool()                     # N, [B, N]
    inputs = dict(input_ids=seq.sequences, attention_mask=seq.attention_mask,
                  position_ids=position_ids(seq.attention_mask), logits_to_keep=1)
    hidden = completion_logits(forward(student, True, **inputs)[1], n)[keep]              # [M, H_s] M tokens
    t_hidden = seq.teacher_hidden                                                          # [B, N, H_t] or None
    if teacher is not None and t_hidden is None:  # ground truth, the student's samples: the teacher has not seen them
        with torch.no_grad():
            t_hidden = completion_logits(forward(teacher, True, **inputs)[1], n)           # [B, N, H_t]
    targets = seq.sequences[:, -n:][keep] if teacher is None else t_hidden[keep]           # SFT: [M] ids; [M, H_t]

    def chunk_loss(raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # summed over the chunk's C tokens
        s_logits = soft_cap(student, raw)                                                  # [C, V_s]
        if teacher is None:  # the forward KL to the data's one-hot distribution
            return F.cross_entropy(s_logits.float(), target, reduction="sum")
        with torch.no_grad():
            t_logits = lm_head(teacher, target)                                            # [C, V_t]
        return distill_loss(s_logits, t_logits, torch.ones_like(target[:, 0]), metric, beta, temperature, 1.0)
    if not isinstance(head := student.get_output_embeddings(), torch.nn.Linear):
        raise ValueError(f"{type(student).__name__}: the chunked loss needs a linear output layer, not {type(head)}")
    total = ChunkedSum.apply(chunk_loss, chunk_size, torch.is_grad_enabled(), hidden, targets, head.weight, head.bias)
    return total / (keep.sum().clamp(min=1) if num_tokens is None else num_tokens)
# ========================================== end of the method ==========================================

# The program: flags, training loop, evaluation, data, main. It calls the method above as any caller would.
import contextlib, csv, io, itertools, json, os, random, re, shlex, shutil, sys, tempfile, time, zlib  # noqa: E401
from argparse import ArgumentError, RawDescriptionHelpFormatter
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Literal
from torch.utils.data import DataLoader
from safetensors import SafetensorError
from tqdm import tqdm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, HfArgumentParser,
                          PreTrainedTokenizerFast, get_linear_schedule_with_warmup)
from transformers import logging as hf_logging

# --- Arguments: one dataclass; `--help` lists every field with its default. Groups: run, data, training, AdaSwitch.
arg = lambda default, text: field(default=default, metadata={"help": f"{text} (default: {default})"})  # noqa: E731

@dataclass
class Args:
    seed: int = arg(0, "seed for initialization, data order and sampling")
    output_dir: str | None = arg(None, "the run's folder; None: runs/<method>-<dataset>-<seed>-<time>")
    save_every: int = arg(100, "steps between checkpoints in --output-dir (one is also written at the end)")
    resume: bool = arg(False, "continue the run in --output-dir; new --lr/--dtype/--weight-decay/--max-grad-norm ok")
    overwrite: bool = arg(False, "replace a run already in --output-dir")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "bfloat16: bf16 teacher, student autocast; float32: neither")
    log_every: int = arg(10, "steps between lines of metrics.jsonl")
    eval_every: int = arg(0, "steps between evaluations during training (0: only before and after)")
    teacher: str | None = arg(None, "teacher: hub id or local folder; None: the built-in toy teacher")
    student: str | None = arg(None, "student: hub id or local folder; None: the built-in toy student")
    dataset: str = arg("toy", "toy (addition), toy_summary, gsm8k, dialogsum, or a local .json/.jsonl/.csv file")
    prompt_field: str | None = arg(None, "prompt column of a local file (gsm8k: question, dialogsum: dialogue)")
    response_field: str | None = arg(None, "response column of a local file (gsm8k: answer, dialogsum: summary)")
    chat_template: bool = arg(True, "wrap prompts in the tokenizer's chat template when it has one")
    max_prompt_len: int = arg(512, "prompts longer than this are cut from the left")
    max_new_tokens: int | None = arg(None, "completion length limit; None: 256 for gsm8k, else 64")
    eval_samples: int = arg(500, "test examples used for evaluation")
    score: Literal["auto", "number", "rouge", "exact"] = arg("auto", "final number, ROUGE-L, exact; auto: by task")
    toy_digits: int = arg(3, "toy task: digits per operand")
    toy_teacher_steps: int | None = arg(None, "toy tasks: SFT steps of the teacher; None: 600, 3000 for toy_summary")
    toy_student_steps: int = arg(400, "toy tasks: SFT warm-up steps for the student (cached in --toy-dir)")
    toy_dir: str = arg("runs/toy", "toy tasks: where the trained toy teacher and student are cached")
    method: Literal["sft", "supervised_kd", "off_policy", "on_policy", "skd", "adaswitch"] = arg(
        "adaswitch", "how training sequences are made")
    max_steps: int = arg(300, "optimizer steps")
    batch_size: int = arg(32, "sequences per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float | None = arg(None, "peak learning rate of AdamW; None: 5e-4 for the toy models, 1e-5 for a --student")
    warmup_ratio: float = arg(0.1, "fraction of steps of linear warm-up, then linear decay to 0")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    loss: Literal[METRICS] = arg("fkl", "token-level training divergence to the teacher")
    temperature: float = arg(1.0, "sampling temperature of rollouts; also divides logits in the divergences")
    window: int = arg(8, "L: how many past divergences the moving average covers")
    k: float = arg(1.5, "K: switch when d_i > K * moving average (inf: never)")
    switch_metric: Literal[METRICS] = arg("fkl", "divergence d_i used by the switch rule")
    switch_beta: float = arg(0.5, "JSD weight of --switch-metric jsd, in (0, 1)")  # the paper is silent: symmetric JSD
    min_history: int | None = arg(None, "divergences a row needs before it may switch; None: window")
    teacher_writes_switch_token: bool = arg(True, "the teacher writes the token at the switch step")
    skd_top_k: int | None = arg(None, "SKD: the teacher replaces tokens outside its top-k; None: 25, 2 on the toys")
    beta: float = arg(0.5, "generalized JSD weight of --loss jsd, in (0, 1)")

class UsageError(Exception):
    """Bad input from the command line, the data or a run's folder: printed as one line, no traceback."""

def require(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)

def filled_defaults(args: Args) -> dict:
    """The defaults that depend on the models or the task: the flags that are None in Args."""
    return {"skd_top_k": 2 if args.teacher is None else 25,  # top-25 of 25 tokens: on-policy
            "toy_teacher_steps": 3000 if args.dataset == "toy_summary" else 600,  # counting: slower
            "lr": 5e-4 if args.teacher is None else 1e-5,  # 5e-4 trains tiny models, wrecks big ones
            "max_new_tokens": 256 if args.dataset == "gsm8k" else 64}  # GSM8K's answers run past 64

def writable(path: str, flag: str) -> None:
    """The nearest existing folder on path must take a new file (root ignores permissions; read-only mounts do not)."""
    folder = next(p for p in Path(path, "x").expanduser().absolute().parents if p.exists())  # path, then its parents
    require(folder.is_dir(), f"{flag} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {folder} ({error.strerror})") from None

def parse_args(argv: list[str] | None = None) -> Args:
    """Flags -> Args, refusing values that leave the mathematics undefined before any model is loaded."""
    try:  # a bad value, an unknown flag: one line instead of argparse's exit
        args, = HfArgumentParser(Args, description=__doc__, formatter_class=RawDescriptionHelpFormatter,
                                 exit_on_error=False).parse_args_into_dataclasses(argv, look_for_args_file=False)
    except (ArgumentError, ValueError) as error:
        raise UsageError(f"{error} (see --help)") from None
    require((args.teacher is None) == (args.student is None), "give both --teacher and --student, or neither")
    require(args.output_dir or not args.resume, "--resume needs the --output-dir of the run to continue")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # named as CleanRL names runs: a second run never erases the first
    args.output_dir = args.output_dir or f"runs/{args.method}-{Path(args.dataset).stem}-{args.seed}-{stamp}"
    require(args.teacher or args.dataset in TOY_TASKS, f"--dataset {args.dataset} needs --teacher and --student")
    args = replace(args, **{name: v for name, v in filled_defaults(args).items() if getattr(args, name) is None})
    for name in ["output_dir", *["toy_dir"] * (args.teacher is None)]:
        writable(getattr(args, name), f"--{name.replace('_', '-')}")  # the folders this run writes in
    for need, ok, names in ((">= 1", lambda v: v >= 1, "max_steps batch_size grad_accum max_new_tokens max_prompt_len "
                                                    "eval_samples skd_top_k log_every save_every toy_digits"),
                            (">= 0", lambda v: 0 <= v < math.inf, "seed eval_every toy_teacher_steps toy_student_steps "
                                                                 "weight_decay"),
                            ("> 0 and finite", lambda v: 0 < v < math.inf, "lr max_grad_norm"),
                            ("in [0, 1]", lambda v: 0 <= v <= 1, "warmup_ratio")):
        for name in names.split():
            require(ok(getattr(args, name)), f"--{name.replace('_', '-')} must be {need}, got {getattr(args, name)}")
    try:  # the method's own checks, so that the CLI and the functions refuse the same values
        SwitchTracker(1, args.window, args.k, min_history=args.min_history)
        divergence(torch.zeros(2), torch.zeros(2), args.loss, args.beta, args.temperature)
    except ValueError as error:
        raise UsageError(error) from None
    require(args.switch_metric != "jsd" or 0 < args.switch_beta < 1, f"--switch-beta must be in (0, 1) for "
            f"--switch-metric jsd, got {args.switch_beta} (0 or 1 is a plain KL: use --switch-metric fkl or rkl)")
    return args

# --- Training sequences: the dataset's for sft and supervised_kd, a rollout in the method's mode otherwise.
ROLLOUT_MODE = {"off_policy": "teacher", "on_policy": "student", "skd": "skd", "adaswitch": "adaswitch"}

def make_sequences(batch: dict, student, teacher, args: Args, stop: list[int], pad_token_id: int,
                   generator: torch.Generator | None = None) -> Rollout:
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]                     # [B, P]
    if args.method not in ROLLOUT_MODE:
        response, response_mask = batch["response_ids"], batch["response_mask"]             # [B, N]
        nothing = torch.zeros_like(response_mask, dtype=torch.bool)                         # [B, N]
        return Rollout(sequences=torch.cat([prompt_ids, response], 1), completion_mask=response_mask,
                       attention_mask=torch.cat([prompt_mask, response_mask], 1), from_teacher=nothing,
                       switch_step=torch.full_like(response_mask[:, 0], -1), divergences=nothing.float(),
                       measured=nothing)
    knobs = ("max_new_tokens window k skd_top_k switch_metric switch_beta temperature min_history "
             "teacher_writes_switch_token")
    return rollout(student, teacher, prompt_ids, prompt_mask, ROLLOUT_MODE[args.method], eos_token_id=stop,
                   pad_token_id=pad_token_id, generator=generator, **{k: getattr(args, k) for k in knobs.split()})

def sequence_stats(seqs: list[Rollout]) -> dict:
    """(sum, count) per statistic over micro-batches (N may differ): a step logs sum / count, the summary totals."""
    join = lambda key: torch.cat([getattr(s, key).flatten() for s in seqs])  # noqa: E731
    mask, switch_step, d = join("completion_mask").bool(), join("switch_step"), join("divergences")  # [sum B*N], [B]
    pair = lambda x: (x.float().sum().item(), x.numel())  # noqa: E731
    return {"switch_rate": pair(switch_step >= 0), "switch_pos": pair(switch_step[switch_step >= 0]),
            "teacher_frac": pair(join("from_teacher")[mask]), "divergence": pair(d[join("measured")]),
            "completion_len": (mask.sum().item(), switch_step.numel())}

ratio = lambda total, count: total / count if count else None  # None: nothing to average  # noqa: E731

# --- Evaluation: greedy completions of the test prompts, scored per task.
def final_number(text: str) -> str | None:
    """GSM8K's convention: the number after '####', else the last number in the text."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text.split("####")[-1])
    number = (numbers[0] if "####" in text else numbers[-1]).replace(",", "") if numbers else None
    return number.rstrip("0").rstrip(".") if number and "." in number else number

def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence) over rouge_score's default tokens: lower-case runs of a-z and 0-9."""
    pred, ref = (re.findall(r"[a-z0-9]+", text.lower()) for text in (prediction, reference))
    lcs = [0] * (len(ref) + 1)  # lcs[j]: LCS of the prediction so far and ref[:j]
    for p in pred:
        diagonal = 0
        for j, r in enumerate(ref, start=1):
            diagonal, lcs[j] = lcs[j], diagonal + 1 if p == r else max(lcs[j], lcs[j - 1])
    precision, recall = lcs[-1] / max(len(pred), 1), lcs[-1] / max(len(ref), 1)
    return 2 * precision * recall / (precision + recall) if lcs[-1] else 0.0

def number_match(prediction: str, reference: str) -> float:
    return float((answer := final_number(prediction)) is not None and answer == final_number(reference))
SCORES = {"number": number_match, "rouge": rouge_l, "exact": lambda pred, ref: float(pred.strip() == ref.strip())}

@torch.no_grad()
def evaluate(model, tokenizer, batches: list[dict], args: Args, score: str, stop: list[int], desc="eval") -> float:
    """Mean score of the model's greedy completions (the student writes alone: rollout mode 'student')."""
    scores = []
    for batch in tqdm(batches, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        out = rollout(model, None, batch["prompt_ids"], batch["prompt_mask"], "student", do_sample=False,
                      max_new_tokens=args.max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out.sequences[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)
        scores += [SCORES[score](text, reference) for text, reference in zip(texts, batch["references"])]
    return sum(scores) / len(scores)

# --- Data: the built-in toy tasks, real datasets, prompt templates, batches.
TASKS = {  # dataset -> (hub name, config, prompt field, response field, template)
    "gsm8k": ("openai/gsm8k", "main", "question", "answer",
              "Solve the problem step by step, then give the final answer after '####'.\n\n{prompt}"),
    "dialogsum": ("knkarthick/dialogsum", None, "dialogue", "summary",
                  "Summarize the following dialogue in a few sentences.\n\n{prompt}")}

def addition_example(rng: random.Random, digits: int) -> dict:
    """'0347+0285=' -> '7+5+0=12 4+8+1=13 3+2+1=06 0+0+0=00 ####00632': column addition with its carries.
    One right answer, and most of its tokens copy the prompt: the divergence sits on a few tokens."""
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    x, y = f"{a:0{digits}d}", f"{b:0{digits}d}"
    columns, carry = [], 0
    for i in reversed(range(digits)):
        total = int(x[i]) + int(y[i]) + carry
        columns.append(f"{x[i]}+{y[i]}+{carry}={total:02d}")
        carry = total // 10
    return {"prompt": f"{x}+{y}=", "response": " ".join(columns) + f" ####{a + b:0{digits + 1}d}"}

def summary_example(rng: random.Random, digits: int) -> dict:
    """'bbbadd=' -> 'b3 1a 2d': each run of a letter as its letter and length, the two in either order, like a
    summary whose wording is free: many right answers, a choice at every item. Its size ignores `digits`."""
    letters = [rng.choice("abcdefgh")]
    for _ in range(rng.randint(1, 7)):  # 2 to 8 runs, each of another letter than the one before
        letters.append(rng.choice([c for c in "abcdefgh" if c != letters[-1]]))
    counts = [rng.randint(1, 3) for _ in letters]
    words = [f"{c}{n}" if rng.random() < 0.5 else f"{n}{c}" for c, n in zip(letters, counts)]
    return {"prompt": "".join(c * n for c, n in zip(letters, counts)) + "=", "response": " ".join(words)}

TOY_TASKS = {"toy": addition_example, "toy_summary": summary_example}

def toy_rows(task: str, digits: int, test_size: int, train_size: int = 20000) -> tuple[list[dict], list[dict]]:
    """Train and test rows from two fixed streams; test prompts (CRC-32 divisible by 10) are never trained on."""
    make, held_out = TOY_TASKS[task], lambda row: zlib.crc32(row["prompt"].encode()) % 10 == 0  # noqa: E731
    test_rng, train_rng = random.Random(f"{task}-test-{digits}"), random.Random(f"{task}-train-{digits}")
    test = itertools.islice(filter(held_out, (make(test_rng, digits) for _ in itertools.count())), test_size)
    return [row for row in (make(train_rng, digits) for _ in range(train_size)) if not held_out(row)], list(test)

def char_tokenizer(chars: str = "0123456789+=# abcdefgh"):
    """A character-level tokenizer for the toy tasks, wrapped like any Hugging Face checkpoint's tokenizer."""
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}, "<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Split(Regex("."), behavior="isolated"), decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")

def read_file(path: Path) -> list[dict]:
    """The rows of a .jsonl, .json (a list of objects) or .csv file; a malformed line is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a byte-order mark
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".csv":  # DictReader puts extra cells under the key None, and None for missing cells
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(row, reader.line_num) for row in reader]
        for row, line in rows:
            require(None not in row and None not in row.values(), f"{path}, line {line}: cells do not match the header")
        return [row for row, _ in rows]
    rows, lines = [], [text] if text.lstrip().startswith("[") else text.split("\n")  # one list, or JSON Lines
    for i, line in enumerate(lines, start=1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}, line {max(i, error.lineno)}: not valid JSON ({error.msg})") from None
    rows = rows[0] if path.suffix == ".json" and rows and isinstance(rows[0], list) else rows
    require(all(isinstance(row, dict) for row in rows), f"{path}: expected one JSON object per row, fields as keys")
    return rows

def text_rows(rows: list[dict], prompt_field: str, response_field: str, name: str) -> list[dict]:
    """{'prompt', 'response'} texts; rows with a missing, null or blank field are dropped, never trained as 'None'."""
    pairs = [(row.get(prompt_field), row.get(response_field)) for row in rows]
    for i, pair in enumerate(pairs, start=1):
        require(not any(isinstance(v, (list, dict)) for v in pair), f"{name}, row {i}: fields must be text, not lists")
    kept = [{"prompt": str(p), "response": str(r)} for p, r in pairs
            if all(v is not None and str(v).strip() for v in (p, r))]
    if len(kept) < len(rows):
        print(f"note: dropped {len(rows) - len(kept)} of {len(rows)} rows of {name}: a missing or empty field")
    return kept

def load_rows(args: Args) -> tuple[list[dict], list[dict]]:
    """(train, test) rows of {'prompt': text, 'response': text}; `encode` adds the task's template."""
    if args.dataset in TOY_TASKS:
        train, test = toy_rows(args.dataset, args.toy_digits, args.eval_samples)
        need = max(len(row["response"]) for row in train + test) + 1
        require(need <= args.max_new_tokens, f"--dataset {args.dataset} needs --max-new-tokens {need} or more")
        return train, test
    if args.dataset in TASKS:
        hub, config, prompt_field, response_field, _ = TASKS[args.dataset]
        try:
            from datasets import load_dataset
            splits = {name: list(rows) for name, rows in load_dataset(hub, config).items()}
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load dataset {hub}: {str(error).splitlines()[0]}") from None
    elif (path := Path(args.dataset).expanduser()).suffix in (".json", ".jsonl", ".csv") and path.is_file():
        splits, prompt_field, response_field = {"train": read_file(path)}, "prompt", "response"
    else:
        raise UsageError(f"--dataset {args.dataset}: no such .json/.jsonl/.csv file, nor one of {[*TOY_TASKS, *TASKS]}")
    prompt_field, response_field = args.prompt_field or prompt_field, args.response_field or response_field
    columns = sorted({column for row in splits["train"] for column in row})
    require(columns, f"{args.dataset} is empty: it needs one example per row")
    for flag, column in (("--prompt-field", prompt_field), ("--response-field", response_field)):
        require(column in columns, f"{args.dataset} has no field {column!r} (fields: {columns}); set {flag}")
    train = text_rows(splits["train"], prompt_field, response_field, args.dataset)
    if "test" in splits:
        test = text_rows(splits["test"], prompt_field, response_field, f"{args.dataset} (test)")
    else:  # one local file: a tenth of it (at most 1000 rows) held out, the same rows whatever --seed, --eval-samples
        n, train = min(1000, max(1, len(train) // 10)), random.Random(0).sample(train, len(train))
        test, train = train[:n], train[n:]
    require(train and test, f"--dataset {args.dataset} gave {len(train)} train and {len(test)} test examples")
    return train, test[:args.eval_samples]

def encode(rows: list[dict], tokenizer, args: Args) -> list[dict]:
    """Token ids: the prompt in its task and chat templates (over --max-prompt-len: its content's start cut, never the
    instruction or the chat markup), and the response as the model ends a turn."""
    template = TASKS[args.dataset][4] if args.dataset in TASKS else "{prompt}"
    chat = args.chat_template and tokenizer.chat_template is not None

    def render(content: str, *response: str) -> str:  # the chat template's text, with the answer if one is given
        turns = [{"role": "user", "content": template.format(prompt=content)}]
        turns += [{"role": "assistant", "content": text} for text in response]
        return tokenizer.apply_chat_template(turns, add_generation_prompt=not response, tokenize=False) if chat \
            else turns[0]["content"]
    prompts = [render(row["prompt"]) for row in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
    for i in [i for i, ids in enumerate(prompt_ids) if len(ids) > args.max_prompt_len]:
        cut = len(prompt_ids[i]) - args.max_prompt_len
        content = tokenizer(rows[i]["prompt"], add_special_tokens=False)["input_ids"]
        while len(prompt_ids[i]) > args.max_prompt_len:  # cut the content's start, render again (a token may shift)
            require(cut <= len(content), f"--max-prompt-len {args.max_prompt_len} cannot hold the prompt's template")
            prompt_ids[i] = tokenizer(render(tokenizer.decode(content[cut:])), add_special_tokens=not chat)["input_ids"]
            cut += 1
    if chat:  # the assistant turn as the template ends it: the whole conversation minus the prompt
        turns = [render(row["prompt"], row["response"]) for row in rows]
        require(all(turn.startswith(prompt) for turn, prompt in zip(turns, prompts)),
                "the chat template's conversation does not extend its prompt; use --no-chat-template")
    texts = [t[len(p):] for t, p in zip(turns, prompts)] if chat else [row["response"] for row in rows]
    eos = [] if chat else [tokenizer.eos_token_id]  # a chat template ends the turn itself
    responses = [r + eos for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [{"prompt": p, "response": r[:args.max_new_tokens], "reference": row["response"]}
            for p, r, row in zip(prompt_ids, responses, rows) if p]

def collate(examples: list[dict], pad_token_id: int, device) -> dict:
    """Left-padded prompts [B, P] and right-padded responses [B, N], with their masks."""
    def pad(key: str, side: str, mask: bool = False) -> torch.Tensor:
        rows = [torch.ones(len(e[key]), dtype=torch.long) if mask else torch.tensor(e[key]) for e in examples]
        return torch.nn.utils.rnn.pad_sequence(rows, True, 0 if mask else pad_token_id, side).to(device)
    return {"prompt_ids": pad("prompt", "left"), "prompt_mask": pad("prompt", "left", mask=True),
            "response_ids": pad("response", "right"), "response_mask": pad("response", "right", mask=True),
            "references": [e["reference"] for e in examples]}

def batch_stream(examples: list[dict], batch_size: int, pad_token_id: int, device, seed: int | None = None):
    """One pass in order when seed is None (evaluation); else endless reshuffled passes of full batches (training)."""
    loader = DataLoader(examples, min(batch_size, len(examples)), shuffle=seed is not None, drop_last=seed is not None,
                        collate_fn=lambda rows: collate(rows, pad_token_id, device),
                        generator=None if seed is None else torch.Generator().manual_seed(seed))
    yield from loader
    while seed is not None:  # each pass over the loader reshuffles (itertools.cycle would replay the first pass)
        yield from loader

# --- Training loop: AdamW steps on the method's sequences, a checkpoint every --save-every steps.
def save_pretrained(folder: Path, *parts) -> None:
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bars, hidden like its loading bars
    for part in parts:  # the model and its tokenizer
        part.save_pretrained(folder)

def checkpoints(out: Path, whole: bool = False) -> list[Path]:
    """The checkpoint-<step> folders this program wrote in out (whole: with a state.pt), oldest step first."""
    ours = [p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
            and ((p / "state.pt").is_file() or not whole and (p / "student").is_dir())]
    return sorted(ours, key=lambda p: int(p.name.split("-")[1]))

def save_checkpoint(out: Path, student, tokenizer, state: dict) -> None:
    """out/checkpoint-<step>: student/ and state.pt (step, optimizer, schedule, totals), written last by rename: a
    folder without it is an interrupted save (passed over); the older ones go only after. A failed write: an OSError."""
    folder = out / f"checkpoint-{state['step']}"
    try:
        save_pretrained(folder / "student", student, tokenizer)
        torch.save(state, folder / "state.pt.partial")
    except (OSError, SafetensorError, RuntimeError) as error:  # a full disk: safetensors' and torch.save's own errors
        shutil.rmtree(folder, ignore_errors=True)  # frees what it took; the older checkpoints stay whole
        raise OSError(f"cannot save {folder}: {str(error).strip().splitlines()[0]}") from None
    os.replace(folder / "state.pt.partial", folder / "state.pt")
    for old in set(checkpoints(out)) - {folder}:
        shutil.rmtree(old)

def training_autocast(dtype: str, device: torch.device):
    """The context of every training step: bf16 autocast under --dtype bfloat16 on any device, none under float32."""
    return torch.autocast(device.type, torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

def train(student, teacher, batches, args: Args, tokenizer, stop: list[int], test_batches: list[dict] | None = None,
          score: str = "exact", out: Path | None = None, state: dict | None = None, desc: str = "distill") -> dict:
    """{statistic: [sum, count]} over the whole run (a resumed one's too), the steps' seconds included."""
    student.train()
    # fused: one kernel per step, no temporary the size of a parameter (as Trainer's default, adamw_torch_fused)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * args.max_steps), args.max_steps)
    if state is not None:  # the student's weights came with it; the rest of where the run stopped is here
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        schedule.base_lrs = [args.lr]  # --resume may change --lr, --weight-decay: the schedule goes on at its step
        for group in optimizer.param_groups:
            group.update(initial_lr=args.lr, lr=args.lr * schedule.lr_lambdas[0](schedule.last_epoch),
                         weight_decay=args.weight_decay)
    autocast = training_autocast(args.dtype, student.device)
    scorer = None if args.method == "sft" else teacher  # sequence_loss without a teacher: the log-likelihood (SFT)
    first, totals = (1, {}) if state is None else (state["step"] + 1, state["totals"])
    bar = tqdm(range(first, args.max_steps + 1), desc=desc, initial=first - 1, total=args.max_steps, leave=False,
               disable=not sys.stderr.isatty())
    try:
        for step in bar:
            # The step's random draws (rollout samples, dropout) follow from (seed, step) alone, so a resumed run draws
            # what the uninterrupted one drew, and checkpoints need no random states.
            torch.manual_seed(args.seed * 1_000_003 + step)
            start, tokens, loss, seqs = time.perf_counter(), 0, 0.0, []
            for _ in range(args.grad_accum):  # made, scored and backpropagated one at a time: flat memory
                with autocast:
                    seq = make_sequences(next(batches), student, teacher, args, stop, tokenizer.pad_token_id)
                    total = sequence_loss(student, scorer, seq, args.loss, args.beta, args.temperature, num_tokens=1.0)
                total.backward()
                tokens, loss = tokens + seq.completion_mask.sum(), loss + total.detach()
                seq.teacher_hidden = None  # [B, N, H]: freed before the next rollout, not held for the whole window
                seqs.append(seq)
            # Summed over the window, divided by its token count: every token weighs the same, whichever micro-batch.
            num_tokens = tokens.clamp(min=1).float()
            for grad in (p.grad for p in student.parameters() if p.grad is not None):
                grad /= num_tokens  # in place: a copy of Gemma's embedding gradient would add 0.7 GB to the peak
            loss = loss / num_tokens
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            if not (loss.isfinite() and norm.isfinite()):
                raise FloatingPointError(f"the loss is {loss.item():g} (gradient norm {norm.item():g}): no update made")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            stats, seconds = {"loss": (loss.item(), 1), **sequence_stats(seqs)}, time.perf_counter() - start
            record = {"step": step, **{key: ratio(*pair) for key, pair in stats.items()},
                      "tokens_per_s": num_tokens.item() / seconds, "lr": schedule.get_last_lr()[0]}
            for key, pair in {**stats, "seconds": (seconds, 1)}.items():  # evaluations and saves are not training time
                totals[key] = [a + b for a, b in zip(totals.get(key, (0, 0)), pair)]
            if test_batches and (args.eval_every and step % args.eval_every == 0 or step == args.max_steps):
                record["eval_score"] = evaluate(student, tokenizer, test_batches, args, score, stop)
            shown = ("switch_rate", "teacher_frac") if args.method in ("adaswitch", "skd") else ()  # the rest is fixed
            bar.set_postfix(loss=f"{record['loss']:.3f}", **{key: f"{record[key]:.2f}" for key in shown})
            if out is not None and (step % args.log_every == 0 or "eval_score" in record):
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if out is not None and (step % args.save_every == 0 or step == args.max_steps):
                save_checkpoint(out, student, tokenizer, {"step": step, "optimizer": optimizer.state_dict(),
                                                          "schedule": schedule.state_dict(), "totals": totals})
    except FloatingPointError as error:  # non-finite logits (a rollout's, an evaluation's) or loss: main's advice
        raise FloatingPointError(str(error), step, schedule.last_epoch) from None  # last_epoch: updates in the weights
    return totals

# --- Main: the toy models of the default run, loading, the run's folder, evaluation, training, the report.
def prepare_toy(args: Args, device) -> Args:
    """A toy teacher that solves the task and a briefly warmed-up student, cached in --toy-dir; args names them."""
    tokenizer, rows = char_tokenizer(), toy_rows(args.dataset, args.toy_digits, 0)[0]
    longest = max(len(row["response"]) for row in rows) + 1  # + EOS
    # Fixed SFT settings in float32: the models depend on the --toy-* flags (in the folder name) and the device alone.
    sft = replace(Args(), method="sft", dataset=args.dataset, lr=3e-3, warmup_ratio=0.05, max_new_tokens=longest)
    for name, shape, steps in (("teacher", dict(n_embd=128, n_layer=4, n_head=4), args.toy_teacher_steps),
                               ("student", dict(n_embd=64, n_layer=2, n_head=2), args.toy_student_steps)):
        path = Path(args.toy_dir) / f"{args.dataset}-{args.toy_digits}digits-{name}-{steps}steps"
        if not path.is_dir():  # written whole under another name, then renamed: a killed save is not a cached model
            print(f"toy {name}: {steps} SFT steps, once; cached in {path}")
            torch.manual_seed(0)  # the same toy models whatever --seed, so runs with different seeds share a start
            config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,  # 1024 positions
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
            model = GPT2LMHeadModel(config).to(device)
            batches = batch_stream(encode(rows, tokenizer, sft), sft.batch_size, tokenizer.pad_token_id, device, seed=0)
            train(model, None, batches, replace(sft, max_steps=steps), tokenizer, [], desc=f"toy {name} (SFT)")
            shutil.rmtree(partial := path.with_name(path.name + ".partial"), ignore_errors=True)
            save_pretrained(partial, model, tokenizer)
            os.replace(partial, path)
        args = replace(args, **{name: str(path)})
    return args

def from_pretrained(auto, name: str, **kwargs):
    """AutoModelForCausalLM or AutoTokenizer from a hub id or a save_pretrained folder; a failure is one line."""
    require(not name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir(), f"no model folder {name}")
    try:
        return auto.from_pretrained(os.path.expanduser(name), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"cannot load {auto.__name__} from {name}: {str(error).strip().splitlines()[0]}") from None

def load_models(args: Args, device, student_path: str | None = None):
    tokenizers = [from_pretrained(AutoTokenizer, name) for name in (args.student, args.teacher)]
    for name, tokenizer in zip((args.student, args.teacher), tokenizers):  # a folder without one: an empty one
        require(len(tokenizer.get_vocab()) > len(tokenizer.all_special_tokens), f"{name} has no tokenizer files")
    probe = "Distillation 101: 3 + 4 = 7, naïve café, 東京.\n"  # the same vocabulary and the same encoding
    require(len({(tuple(sorted(t.get_vocab().items())), tuple(t(probe)["input_ids"])) for t in tokenizers}) == 1,
            "the teacher's and the student's tokenizers differ (ids are compared one to one): use one family")
    tokenizer = tokenizers[0]
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.pad_token or tokenizer.eos_token
    teacher = from_pretrained(AutoModelForCausalLM, args.teacher, dtype=getattr(torch, args.dtype))
    # The student keeps float32 weights whatever --dtype: bf16 weights would round away most AdamW updates.
    student = from_pretrained(AutoModelForCausalLM, str(student_path or args.student), dtype=torch.float32).to(device)
    for name, model in ((args.teacher, teacher), (student_path or args.student, student)):
        require(all(p.isfinite().all() for p in model.parameters()), f"{name} has NaN or inf weights: damaged?")
    logits = min(m.get_output_embeddings().weight.shape[0] for m in (teacher, student))
    require(len(tokenizer) <= logits, f"the tokenizer has {len(tokenizer)} tokens, a model only {logits} logits")
    require(args.method != "skd" or args.skd_top_k < len(tokenizer),
            f"--skd-top-k {args.skd_top_k} covers the {len(tokenizer)}-token vocabulary (SKD = on_policy); lower it")
    limit = min(getattr(m.config, "max_position_embeddings", None) or math.inf for m in (teacher, student))
    require(args.max_new_tokens < limit, f"--max-new-tokens {args.max_new_tokens} fills all {limit} model positions")
    require(args.max_prompt_len + args.max_new_tokens <= limit, f"--max-prompt-len {args.max_prompt_len} + "
            f"--max-new-tokens {args.max_new_tokens} exceed the models' {limit} positions: use --max-prompt-len <= "
            f"{limit - args.max_new_tokens}")
    return tokenizer, teacher.to(device).eval().requires_grad_(False), student

RESUMABLE = ("dtype", "lr", "weight_decay", "max_grad_norm")  # the flags --resume may change: not the data, not shapes

def open_run(args: Args, out: Path) -> dict | None:
    """None for a new run (an earlier run's files go under --overwrite); with --resume, the newest whole checkpoint."""
    ran = [p for p in (out / "args.json", out / "metrics.jsonl", out / "summary.json", out / "student",
                       *checkpoints(out)) if p.exists()]
    if not args.resume:
        require(not ran or args.overwrite, f"{out} already holds a run: --resume, --overwrite, or another --output-dir")
        for path in ran:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    require((out / "args.json").is_file(), f"--resume: {out} holds no run (args.json) to continue")
    saved = json.loads((out / "args.json").read_text())
    for name, value in asdict(args).items():  # all but these must be the run's
        require(name in ("output_dir", "resume", "overwrite", "save_every", "log_every", "eval_every",
                         *RESUMABLE) or saved.get(name) == value, f"--resume: --{name.replace('_', '-')} is {value} "
                f"here but {saved.get(name)} in the run in {out}; resume with the run's flags (only "
                f"{', '.join('--' + name.replace('_', '-') for name in RESUMABLE)} may change)")
    require(whole := checkpoints(out, True), f"--resume: {out} holds no whole checkpoint; start again (--overwrite)")
    try:
        state = torch.load(path := whole[-1] / "state.pt")
    except Exception as error:  # any failure to read it: truncated, not a checkpoint, another format
        raise UsageError(f"--resume: {path} is damaged ({type(error).__name__}); start again (--overwrite)") from None
    require("totals" in state, f"--resume: {path} is from an older adaswitch.py (no totals); start again (--overwrite)")
    changed = {name: [saved.get(name), new] for name in RESUMABLE if (new := getattr(args, name)) != saved.get(name)}
    print(f"resuming from step {state['step']} of {out}", *(f"--{n.replace('_', '-')} {new} (was {old})"
                                                           for n, (old, new) in changed.items()), sep=", ")
    if changed:  # args.json: the flags a later --resume compares with; under "changes", each with the step it follows
        saved |= {"changes": [*saved.get("changes", []), {"step": state["step"], **changed}]}
        (out / "args.json").write_text(json.dumps(saved | {name: new for name, (_, new) in changed.items()}, indent=1))
    return {**state, "student": path.parent / "student"}

def stop_ids(tokenizer, *models) -> list[int]:
    """The tokenizer's EOS and each model's generation_config eos ids (<|im_end|>, <|eot_id|>, <end_of_turn>)."""
    eos = [getattr(getattr(model, "generation_config", None), "eos_token_id", None) for model in models]
    ids = {tokenizer.eos_token_id, *(i for e in eos for i in (e if isinstance(e, list) else [e]))}
    return sorted(i for i in ids if i is not None)

def advice(given: Args, out: Path, what: str, step: int | None = 0, weights: int = 0) -> str:
    """The line after a failure, with the command that goes on. A failed write (step None): make room, then resume the
    last whole checkpoint. Non-finite numbers at `step` from the weights after step `weights`: a checkpoint holding
    them would replay that step (same data, same draws) whatever --lr: then float32, or a new start; else lower --lr."""
    whole, lr = checkpoints(out, whole=True), min(float(f"{given.lr / 10:g}"), filled_defaults(given)["lr"])
    held, again = (f"{whole[-1]} holds those weights: ", "resume") if whole else ("", "overwrite")
    if step is None:
        how, changes = (f"{whole[-1]} is whole: make room, then continue with" if whole else
                        "make room, then start again"), {again: True}
    elif whole and int(whole[-1].name.split("-")[1]) < weights:
        how, changes = f"continue from {whole[-1]} with a lower --lr", {"resume": True, "lr": lr}
    else:
        how, changes = ((f"{held}go on in float32", {"dtype": "float32", again: True}) if given.dtype == "bfloat16"
                        else (f"{held}start again with a lower --lr", {"overwrite": True, "lr": lr}))
    flags, default = {**asdict(given), "resume": False, "overwrite": False, **changes}, filled_defaults(given)
    words = [w for name, value in flags.items() if name in changes or value != default.get(name, getattr(Args, name))
             for w in (f"--{name.replace('_', '-')}", *[str(value)] * (value is not True))]
    what = what if step is None else f"step {step}: {what}"
    return f"{what}; {how}: {shlex.join(['python', os.path.relpath(__file__), *words])}"

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # loading bars for every model file would bury the report
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started, (train_rows, test_rows) = time.perf_counter(), load_rows(args)  # bad data: stop before loading models
    out, given, state = Path(args.output_dir), args, open_run(args, Path(args.output_dir))
    args = prepare_toy(args, device) if args.teacher is None else args
    tokenizer, teacher, student = load_models(args, device, state and state["student"])
    stop, pad = stop_ids(tokenizer, teacher, student), tokenizer.pad_token_id
    train_batches = batch_stream(encode(train_rows, tokenizer, args), args.batch_size, pad, device, seed=args.seed)
    test_batches = list(batch_stream(encode(test_rows, tokenizer, args), args.batch_size, pad, device))
    auto = {"toy": "number", "toy_summary": "rouge", "gsm8k": "number", "dialogsum": "rouge"}.get(args.dataset)
    score, log = args.score if args.score != "auto" else auto or "exact", out / "metrics.jsonl"
    try:  # from here on, non-finite numbers and failed writes end in one line with the command that goes on
        if state is not None:  # metrics.jsonl continues from the checkpoint, the data after the batches it used
            train_batches = itertools.islice(train_batches, state["step"] * args.grad_accum, None)
            log.write_text("".join(r for r in log.read_text().splitlines(True) if json.loads(r)["step"] <= state["step"]))
        else:  # a new run: its folder is written only now that the data and the models have loaded
            out.mkdir(parents=True, exist_ok=True)
            (out / "args.json").write_text(json.dumps(asdict(given), indent=1))
            print(f"evaluating the teacher and the student on {len(test_rows)} test examples ({score} score)")
            before = {"teacher_score": evaluate(teacher, tokenizer, test_batches, args, score, stop, "eval teacher"),
                      "eval_score": evaluate(student, tokenizer, test_batches, args, score, stop, "eval student")}
            log.write_text(json.dumps({"step": 0, **before}) + "\n")
        print(f"distilling: {args.method}, {args.max_steps} steps at lr {args.lr:g}, into {out}")
        totals = train(student, teacher, train_batches, args, tokenizer, stop, test_batches, score, out, state)
        save_pretrained(out / "student", student, tokenizer)
    except FloatingPointError as error:  # from train: (what, step, weights); else the evaluation before it
        raise UsageError(advice(given, out, *error.args)) from None
    except (OSError, SafetensorError) as error:  # a full disk, a read-only folder: checkpoints stay whole (--resume)
        raise UsageError(advice(given, out, str(error), None)) from None
    first, *_, last = [json.loads(line) for line in log.read_text().splitlines()]  # the last: the final evaluation
    summary = {"method": args.method, "dataset": args.dataset, "score": score, "teacher": first["teacher_score"],
               "student_before": first["eval_score"], "student_after": last["eval_score"],
               **{key: ratio(*pair) for key, pair in totals.items() if key != "seconds"},  # loss, switch_rate, ...
               "train_seconds": totals["seconds"][0], "seconds_per_step": ratio(*totals["seconds"]),
               "total_seconds": time.perf_counter() - started, "args": asdict(given)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    show = lambda key, form=".2f": "n/a" if summary[key] is None else format(summary[key], form)  # noqa: E731
    print(f"{args.method} on {args.dataset}, {args.max_steps} steps ({score} score on {len(test_rows)} test examples)")
    print(f"  teacher        {show('teacher', '.3f')}\n  student        {show('student_before', '.3f')} -> "
          f"{show('student_after', '.3f')}\n  loss           {show('loss', '.4f')}   divergence "
          f"{show('divergence', '.4f')}   completion {show('completion_len', '.1f')} tokens\n  switch rate    "
          f"{show('switch_rate')}   switch step {show('switch_pos', '.1f')}   teacher tokens {show('teacher_frac')}")
    print(f"  time           {summary['train_seconds']:.0f} s training, {summary['total_seconds']:.0f} s in all")
    return summary

if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are whole (see save_checkpoint), so say how to go on
        sys.exit("interrupted: run the same command with --resume to continue from the last checkpoint")
