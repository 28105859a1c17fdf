"""Speed ratios of adaswitch.rollout on CPU, on a tiny random GPT-2 pair: a report, not a test.

    python bench.py                                   # the defaults: about 70 s of CPU time on one thread
    python bench.py --repeats 9 --new-tokens 128 --batch 16

Every case writes exactly --new-tokens tokens per row (no EOS exists), with plain sampling at T = 1.
  1. student / generate      rollout(mode="student") / HF student.generate, same sampling and lengths:
                             our decoding loop against HF's, on the same model.            target <= 1.0
  2. lockstep / (s + t)      rollout(adaswitch, k=inf) / (rollout(student) + rollout(teacher)). No row
                             switches, so both models run every step: what the lockstep loop (divergence,
                             tracker, bookkeeping) adds to two separate rollouts. On CPU this includes a
                             few % from alternating two models' weights through the cache.   target <= 1.1
  3. early switch / skd      rollout(adaswitch, k=0, window=4) / rollout(skd). Every row switches once its
                             window is full; from then on only the teacher runs, SKD runs both. target <= 0.9
  4. single / one batch      --batch single-row rollouts / one batch of --batch rows (adaswitch, --k: rows
                             switch at scattered steps, and the batch runs the student until the last row
                             has switched). Higher is better.                                 target >= 4
Timing: torch.set_num_threads(1) (tiny models gain nothing from threads, and one thread is steadier on a
shared machine), measured as this process's CPU time (time.process_time; --clock wall for perf_counter),
which does not count the time other processes hold the core. Each round runs every case once, in turn;
each ratio is computed within a round, and the table shows the median over rounds with the range beside it.
"""
import argparse
import math
import statistics
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from adaswitch import rollout

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--repeats", type=int, default=9, help="timed rounds, after one warm-up round")
p.add_argument("--new-tokens", type=int, default=64, help="tokens written per row (N)")
p.add_argument("--batch", type=int, default=16, help="rows per batch (B)")
p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), help="min and max prompt length (P)")
p.add_argument("--vocab", type=int, default=512, help="vocabulary size (V) of both models")
p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
p.add_argument("--k", type=float, default=1.1, help="switch threshold of case 4 (1.1: rows switch at scattered steps, printed)")
p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
               help="cpu: this process's CPU time, blind to other work on the machine; wall: perf_counter")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.set_num_threads(args.threads)
transformers.logging.set_verbosity_error()
N, B, V = args.new_tokens, args.batch, args.vocab


def tiny_gpt2(n_embd: int, n_layer: int) -> GPT2LMHeadModel:
    # No EOS at all, so every case writes exactly N tokens and HF adds no EOS logits processor.
    config = GPT2Config(vocab_size=V, n_positions=args.prompt_len[1] + N, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_embd // 32, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


torch.manual_seed(args.seed)
student, teacher = tiny_gpt2(64, 2), tiny_gpt2(128, 4)

# Left-padded prompts of random lengths; pad id 0 is never a prompt token.
g = torch.Generator().manual_seed(args.seed)
lengths = torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (B,), generator=g)  # [B]
P = int(lengths.max())
mask = (torch.arange(P) >= P - lengths.unsqueeze(-1)).long()                              # [B, P]
ids = torch.randint(1, V, (B, P), generator=g).masked_fill(mask == 0, 0)                  # [B, P]
rows = [(ids[b:b + 1, P - n:], mask[b:b + 1, P - n:]) for b, n in enumerate(lengths.tolist())]  # [1, P_b] each


def roll(mode, input_ids=ids, attention_mask=mask, **kw):
    gen = torch.Generator().manual_seed(args.seed)
    return rollout(student, teacher, input_ids, attention_mask, mode, max_new_tokens=N, temperature=1.0,
                   do_sample=True, eos_token_id=None, pad_token_id=0, generator=gen, **kw)


def generate():
    torch.manual_seed(args.seed)
    return student.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)  # [B, P+N]


cases = {
    "generate": generate,
    "student": lambda: roll("student"),
    "teacher": lambda: roll("teacher"),
    "lockstep": lambda: roll("adaswitch", k=math.inf),
    "skd": lambda: roll("skd"),
    "early": lambda: roll("adaswitch", k=0.0, window=4),
    "batch": lambda: roll("adaswitch", k=args.k),
    "single": lambda: [roll("adaswitch", i, m, k=args.k) for i, m in rows],
}

# Warm-up round, which also checks that every case does what its ratio assumes.
out = {name: fn() for name, fn in cases.items()}
assert out["generate"].shape == (B, P + N), out["generate"].shape
assert all(out[m].sequences.shape == (B, P + N) for m in ("student", "teacher", "lockstep", "skd", "early", "batch"))
assert (out["lockstep"].switch_step == -1).all(), "k = inf must never switch"
assert (out["early"].switch_step >= 0).all(), "k = 0 must switch every row"
assert all(r.sequences.shape[1] == n + N for r, n in zip(out["single"], lengths.tolist()))
print(f"B={B} P={args.prompt_len[0]}..{args.prompt_len[1]} N={N} V={V} threads={args.threads} "
      f"repeats={args.repeats}; early switch steps {sorted(set(out['early'].switch_step.tolist()))}, "
      f"batch (k={args.k}) switch steps {out['batch'].switch_step.tolist()}")

clock = time.process_time if args.clock == "cpu" else time.perf_counter
times = {name: [] for name in cases}  # seconds per call, one entry per round
for _ in range(args.repeats):
    for name, fn in cases.items():
        t0 = clock()
        fn()
        times[name].append(clock() - t0)

print(f"\n{args.clock} time per call, ms (median over rounds): "
      + ", ".join(f"{n} {1e3 * statistics.median(t):.0f}" for n, t in times.items()))
checks = [  # name, numerator cases, denominator cases, target, higher is better
    ("1. student / generate", ["student"], ["generate"], 1.0, False),
    ("2. lockstep / (s + t)", ["lockstep"], ["student", "teacher"], 1.1, False),
    ("3. early switch / skd", ["early"], ["skd"], 0.9, False),
    (f"4. single / one batch (B={B})", ["single"], ["batch"], 4.0, True),
]
print(f"\n{'ratio':30} {'median':>6} {'range':>11} {'target':>7}  result")
for name, num, den, target, higher in checks:
    # One ratio per round, from times taken moments apart, so slow drifts in background load cancel out.
    per_round = [sum(times[n][r] for n in num) / sum(times[n][r] for n in den) for r in range(args.repeats)]
    ratio = statistics.median(per_round)
    ok = ratio >= target if higher else ratio <= target
    print(f"{name:30} {ratio:6.3f} {min(per_round):5.2f}-{max(per_round):<5.2f} "
          f"{('>= ' if higher else '<= ') + str(target):>7}  {'PASS' if ok else 'MISS'}")
