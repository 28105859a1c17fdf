"""When does AdaSwitch hand over to the teacher as the student gets weaker? Students of graded strength cut from the
real Gemma 3 270M teacher of gemma_pair.py (3, 5, 7, 9 of its 18 layers dropped; the teacher itself as the limit),
each measured by KL(teacher || student) on held-out references and ROUGE-L of its greedy continuations; then each
writes its own sampled continuations with both models measured (K = inf), and the switch rule (SwitchTracker) is
replayed on the measured d_i for several K, L and warm-ups. No training; at the defaults 9 minutes with --jobs 2 on
2 CPU cores (one thread each; 72 s for the teacher's rung, 209-227 s for each student's); each student (about 1 GB) is
written once into --out, each rung's measures into --out/drop-<n>.json, which a later call with the same flags reads.

    python gemma_pair.py runs/gemma                                  # the pair, once (teacher/, pydoc.jsonl)
    OMP_NUM_THREADS=1 python ladder.py --pair runs/gemma --out runs/ladder --figure figures/ladder.png --jobs 2
    python -m pytest -q test_ladder.py                               # the tests (tiny random models)
"""
import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, logging as hf_logging

import adaswitch as A
from gemma_pair import prune

KS, WINDOWS, HISTORIES = (1.2, 1.5, 2.0, 3.0), (4, 8, 16), (None, 1)  # None: the default warm-up, a full window


def students(pair: Path, out: Path, drops: list[int]) -> dict[int, Path]:
    """{layers dropped: model folder}: 0 is the teacher; the others are pruned as gemma_pair.py prunes its student
    (the `drop` middle layers, centred), each written once into out/drop-<n> under a .partial name, then renamed."""
    folders = {}
    for drop in sorted(set(drops)):
        folders[drop] = pair / "teacher" if drop == 0 else out / f"drop-{drop}"
        if drop and not folders[drop].is_dir():
            partial = out / f"drop-{drop}.partial"
            kept = prune(pair / "teacher", partial, drop)
            partial.rename(folders[drop])
            print(f"wrote {folders[drop]}: the teacher's layers {kept}")
    return folders


def held_out(pair: Path, tokenizer, prompts: int, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Batches of the first `prompts` rows of pydoc.jsonl in the order adaswitch.py splits it: its held-out rows first
    (a tenth of the file, 32 of 324), then its training rows (nothing here trains), encoded as the CLI encodes them."""
    args = A.Args(dataset=str(pair / "pydoc.jsonl"), max_new_tokens=max_new_tokens, eval_samples=prompts)
    train, test = A.load_rows(args)
    rows = (test + train)[:prompts]
    return list(A.batch_stream(A.encode(rows, tokenizer, args), batch_size, tokenizer.pad_token_id, "cpu"))


@torch.no_grad()
def reference_kl(student, teacher, batches: list[dict]) -> float:
    """Mean KL(teacher || student) per token of the held-out references, teacher-forced (prompt + reference). Logits
    only at the reference's positions, from the last hidden states: [B, T, V] at V = 262k would take gigabytes."""
    total, tokens = 0.0, 0
    for batch in batches:
        seq = A.make_sequences(batch, None, None, A.Args(method="sft"), [], 0)  # prompt + reference, no rollout
        n, keep = seq.completion_mask.shape[1], seq.completion_mask.bool()                          # N, [B, N]
        inputs = dict(input_ids=seq.sequences, attention_mask=seq.attention_mask,
                      position_ids=A.position_ids(seq.attention_mask), logits_to_keep=1)
        hidden = {name: A.completion_logits(A.forward(model, **inputs)[1], n)[keep]              # [M, H] M tokens
                  for name, model in (("student", student), ("teacher", teacher))}
        for i in range(0, len(keep.nonzero()), 64):  # 64 tokens of [64, V] logits at a time
            d = A.divergence(A.lm_head(teacher, hidden["teacher"][i:i + 64]),
                             A.lm_head(student, hidden["student"][i:i + 64]))                   # [C]
            total, tokens = total + d.sum().item(), tokens + len(d)
    return total / tokens


def own_divergences(student, teacher, batches: list[dict], seeds: list[int], max_new_tokens: int, stop: list[int],
                    pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's own sampled continuations (mode adaswitch, K = inf: the rule never fires, so both models run at
    every step), one per prompt and seed: d_i [R, N], the completion mask [R, N], the seed of each row [R]."""
    d, mask, seed_of = [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        for batch in batches:
            out = A.rollout(student, teacher, batch["prompt_ids"], batch["prompt_mask"], "adaswitch", k=math.inf,
                            max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_token_id,
                            generator=generator)
            pad = max_new_tokens - out.divergences.shape[1]  # a batch whose rows all ended early has fewer columns
            d.append(torch.nn.functional.pad(out.divergences, (0, pad)))                            # [B, N]
            mask.append(torch.nn.functional.pad(out.completion_mask, (0, pad)).bool())              # [B, N]
            seed_of += [seed] * len(out.divergences)
    return torch.cat(d), torch.cat(mask), torch.tensor(seed_of)


def replay(d: torch.Tensor, mask: torch.Tensor, k: float, window: int, min_history: int | None) -> torch.Tensor:
    """Switch steps [R] (-1: none) that the rule gives on recorded d_i [R, N]: the switch AdaSwitch would make on these
    same samples (up to its switch a row's tokens do not depend on K), fed column by column as the rollout feeds it."""
    tracker = A.SwitchTracker(len(d), window, k, min_history=min_history)
    for i in range(d.shape[1]):
        tracker.update(d[:, i], mask[:, i])
    return tracker.switch_step


def replay_stats(d: torch.Tensor, mask: torch.Tensor, k: float, window: int, min_history: int | None) -> dict:
    """Switch rate (with its binomial standard error), mean switch step of the rows that switch, and the teacher's
    share of the tokens, counted as the student's completion from the switch on (the teacher writes the switch token);
    the teacher's own continuation may end elsewhere, which a replay cannot know."""
    step, length = replay(d, mask, k, window, min_history), mask.sum(-1)                      # [R], [R]
    switched = step >= 0                                                                       # [R]
    rate = switched.float().mean().item()
    return {"k": k, "window": window, "min_history": window if min_history is None else min_history,
            "switch_rate": rate, "switch_rate_se": math.sqrt(rate * (1 - rate) / len(d)),
            "switch_step": step[switched].double().mean().item() if switched.any() else None,
            "teacher_share": torch.where(switched, length - step, 0).sum().item() / length.sum().item()}


def ratios(d: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """rho_i = d_i / mean(d_{i-L..i-1}), what the rule compares with K, at every written step i >= L [n]."""
    d = torch.where(mask, d, torch.nan)                                                       # [R, N]
    rho = [d[:, i] / d[:, i - window:i].mean(-1) for i in range(window, d.shape[1])]         # N-L of [R]
    rho = torch.stack(rho, 1) if rho else d[:, :0]                                            # [R, N-L]
    return rho[~rho.isnan()]


def quartiles(x: torch.Tensor) -> dict:
    q = x.double().quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.double)).tolist() if len(x) else [None] * 3
    return dict(zip(("q1", "median", "q3"), q))


def measure(student, teacher, tokenizer, batches: list[dict], args, is_teacher: bool) -> dict:
    """One rung: KL on the references, ROUGE-L of greedy continuations, and the rule replayed on the student's own
    sampled continuations over every K, L and warm-up. The teacher against itself has d_i = 0 at every step (KL of a
    distribution to itself), so its replay runs on zeros instead of rollouts that would measure them."""
    stop, pad, started = A.stop_ids(tokenizer, teacher, student), tokenizer.pad_token_id, time.perf_counter()
    eval_args = A.Args(max_new_tokens=args.max_new_tokens)
    rung = {"kl": reference_kl(student, teacher, batches),
            "rouge_l": A.evaluate(student, tokenizer, batches, eval_args, "rouge", stop)}
    first = batches[0]  # what the rung writes, to tell text from noise: greedy, the first two prompts
    greedy = A.rollout(student, None, first["prompt_ids"][:2], first["prompt_mask"][:2], "student", do_sample=False,
                       max_new_tokens=args.max_new_tokens, eos_token_id=stop, pad_token_id=pad)
    rung["greedy"] = tokenizer.batch_decode(greedy.sequences[:, first["prompt_ids"].shape[1]:],
                                            skip_special_tokens=True)
    if is_teacher:
        rows = sum(len(b["references"]) for b in batches) * len(args.seeds)
        d, mask = torch.zeros(rows, args.max_new_tokens), torch.ones(rows, args.max_new_tokens, dtype=torch.bool)
        seed_of = torch.tensor(args.seeds).repeat_interleave(rows // len(args.seeds))
    else:
        d, mask, seed_of = own_divergences(student, teacher, batches, args.seeds, args.max_new_tokens, stop, pad)
    rung.update(completion_len=mask.sum(-1).float().mean().item(), d=quartiles(d[mask]),
                rho={str(window): quartiles(ratios(d, mask, window)) for window in WINDOWS},  # str: as JSON has it
                replay=[{**replay_stats(d, mask, k, window, history),  # pooled, then per seed: the seeds' spread
                         "per_seed": [replay_stats(d[seed_of == s], mask[seed_of == s], k, window,
                                                   history)["switch_rate"] for s in args.seeds]}
                        for k in KS for window in WINDOWS for history in HISTORIES],
                seconds=time.perf_counter() - started)
    return rung


def replayed(rung: dict, k: float, window: int, min_history: int) -> dict:
    """The rung's replay statistics at one K, L and warm-up (min_history = window: the default, a full window)."""
    return next(r for r in rung["replay"] if (r["k"], r["window"], r["min_history"]) == (k, window, min_history))


def table(results: dict, window: int = 8) -> str:
    """The ladder as a Markdown table, one row per rung: KL, ROUGE-L, d_i and rho_i (quartiles), switch rate ± its
    binomial standard error (mean switch step) at each K, at L `window` and the default warm-up, and the teacher's
    share of the tokens at the default K 1.5."""
    def spread(q):
        return "-" if q["median"] is None or math.isnan(q["median"]) else \
            f"{q['median']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})" if q["q3"] > q["q1"] else f"{q['median']:.3g}"

    def rate(r):
        return f"{r['switch_rate']:.2f}" + (f" ± {r['switch_rate_se']:.2f} ({r['switch_step']:.1f})"
                                            if r["switch_step"] is not None else "")
    lines = [f"| layers dropped | KL(teacher ‖ student) | ROUGE-L | median d_i (quartiles) | median d_i / window mean "
             f"(quartiles), L {window} | " + " | ".join(f"K {k:g}: switch rate (step)" for k in KS)
             + " | teacher tokens at K 1.5 |", "| --- " * (6 + len(KS)) + "|"]
    for drop, rung in sorted(results["rungs"].items(), key=lambda item: int(item[0])):
        name = f"{drop} (the teacher)" if int(drop) == 0 else drop
        at = {k: replayed(rung, k, window, window) for k in KS}
        lines.append(f"| {name} | {rung['kl']:.3g} | {rung['rouge_l']:.3f} | {spread(rung['d'])} | "
                     f"{spread(rung['rho'][str(window)])} | " + " | ".join(rate(at[k]) for k in KS)
                     + f" | {at[1.5]['teacher_share']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, window: int = 8):
    """Switch rate and mean switch step against the student's KL, one line per K; solid: the default warm-up (a full
    window), dashed: --min-history 1. A Figure of its own, not pyplot's: a notebook calling it keeps its backend."""
    from matplotlib.figure import Figure
    rungs = sorted(results["rungs"].values(), key=lambda r: r["kl"])
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, k in enumerate(KS):
        for history, style in ((window, "-"), (1, "--")):
            rows = [replayed(rung, k, window, history) for rung in rungs]
            label = f"K = {k:g}" + (", min-history 1" if history == 1 else "")
            for ax, key in zip(axes, ("switch_rate", "switch_step")):
                ax.plot([rung["kl"] for rung in rungs], [math.nan if r[key] is None else r[key] for r in rows], style,
                        marker="o", color=f"C{i}", label=label)
    for ax, ylabel in zip(axes, ("switch rate", "mean switch step (rows that switch)")):
        ax.set(xlabel="KL(teacher || student) on the held-out references", ylabel=ylabel,
               title=f"{ylabel}, L = {window}")
    for rung in rungs:
        axes[0].annotate(f"-{rung['drop']}", (rung["kl"], 1.0), textcoords="offset points", xytext=(0, 4), ha="center",
                         fontsize=8)
    axes[1].legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def rung(drop: int, folder: Path, teacher, tokenizer, batches: list[dict], args) -> dict:
    """One rung's measures, kept in out/drop-<n>.json with the flags that made them: a later call with the same flags
    reads them (the notebook's reruns; rungs computed side by side in other processes), other flags recompute."""
    flags = {"pair": str(args.pair.resolve()), "drop": drop, "prompts": args.prompts, "seeds": args.seeds,
             "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    path = args.out / f"drop-{drop}.json"
    if path.is_file() and (kept := json.loads(path.read_text()))["flags"] == flags:
        print(f"drop {drop}: kept from an earlier run with the same flags, in {path}")
        return kept["rung"]
    student = teacher if drop == 0 else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    measured = {"drop": drop, **measure(student, teacher, tokenizer, batches, args, drop == 0)}
    default = [replayed(measured, k, 8, 8) for k in KS]  # L 8, a full window
    print(f"drop {drop}: KL {measured['kl']:.3f}, ROUGE-L {measured['rouge_l']:.3f}, median d_i "
          f"{measured['d']['median']:.3g}; L 8, switch rate (step) " + ", ".join(
              f"K {r['k']:g}: {r['switch_rate']:.2f} ({r['switch_step'] or math.nan:.1f})" for r in default)
          + f"; {measured['seconds']:.0f} s")
    partial = path.with_suffix(".partial")  # written whole, then renamed: a killed run leaves no half a rung
    partial.write_text(json.dumps({"flags": flags, "rung": measured}, indent=1))
    os.replace(partial, path)
    return measured


def rungs(args, folders: dict[int, Path]) -> dict[str, dict]:
    """{str(drop): rung} in this process: the teacher and the held-out batches loaded once for all of them."""
    hf_logging.disable_progress_bar()  # a line per rung says more than the loading bars of each model
    tokenizer = AutoTokenizer.from_pretrained(args.pair / "teacher", padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(args.pair / "teacher", dtype=torch.float32).eval()
    batches = held_out(args.pair, tokenizer, args.prompts, args.max_new_tokens, args.batch_size)
    return {str(drop): rung(drop, folder, teacher, tokenizer, batches, args) for drop, folder in folders.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=Path, required=True, help="gemma_pair.py's folder (teacher/, pydoc.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("runs/ladder"), help="the students, their rungs, ladder.json")
    parser.add_argument("--drops", type=int, nargs="+", default=[0, 3, 5, 7, 9],
                        help="middle layers each student drops (0: the teacher itself, the limit)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (adaswitch.py's 32 test rows first)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds of the rollouts")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens per continuation")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per rollout batch")
    parser.add_argument("--figure", type=Path, default=Path("figures/ladder.png"), help="the figure (PNG)")
    parser.add_argument("--jobs", type=int, default=1, help="rungs measured side by side, one process each")
    args = parser.parse_args(argv)
    if not (args.pair / "teacher").is_dir() or not (args.pair / "pydoc.jsonl").is_file():
        raise SystemExit(f"error: {args.pair} has no teacher/ and pydoc.jsonl; make them: "
                         f"python gemma_pair.py {args.pair}")
    args.out.mkdir(parents=True, exist_ok=True)
    folders = students(args.pair, args.out, args.drops)
    if args.jobs > 1:  # one rung per task; "spawn": fresh processes, safe from a notebook's threads
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = pool.map(rungs, [args] * len(folders), [{drop: folder} for drop, folder in folders.items()])
            measured = {drop: rung for part in parts for drop, rung in part.items()}
    else:
        measured = rungs(args, folders)
    results = {"prompts": args.prompts, "seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
               "threads": torch.get_num_threads(), "jobs": args.jobs, "rungs": measured}
    (args.out / "ladder.json").write_text(json.dumps(results, indent=1))
    plot(results, args.figure)
    print(f"wrote {args.out / 'ladder.json'} and {args.figure}")
    return results


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # 1 unless asked: 2 threads on 2 shared cores
    print(table(main()))                                                 # wait for each other (see conftest.py)
