"""The training comparison on the weakest student that still writes text (issue 27, item 3): ladder.py's drop-5
student (5 of the Gemma 3 270M teacher's 18 layers dropped) trained by on-policy, off-policy, AdaSwitch (K 1.5) and
the fixed prefix (--k 0), each through `adaswitch.py`'s CLI (A.main) with tutorial section 8.3's flags (4 rollouts of
16 tokens, --lr 1e-5, no warm-up), seeds 0 and 1, two runs at a time (one thread each). Each run is scored as 8.3
scores its students, at step 0 and at every --eval-every: on the 32 held-out prompts, the teacher's greedy
continuation of 16 tokens is the reference; the held-out KL is the teacher-forced KL(teacher || student) per token on
it, ROUGE-L that of the student's own greedy continuation against it. The scores are taken inside the run, when the
CLI evaluates (a wrapper of A.evaluate, as in docs/dip_probe.py): training is unchanged (each step seeds itself from
(seed, step)), and no checkpoint is written (nothing resumes here). Writes <out>/weak_compare.json and
<out>/weak_compare.md (the table); the runs' folders go in <out>/<method>-<seed> and are reused when their flags match.

    python ladder.py --pair runs/gemma --out runs/ladder                  # the drop-5 student, once
    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/weak_compare.py --pair runs/gemma --student runs/ladder/drop-5 \\
        --out /tmp/weak --steps 20 --eval-every 10
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import adaswitch as A

METHODS = {"on_policy": ["--method", "on_policy"], "off_policy": ["--method", "off_policy"],
           "adaswitch": ["--method", "adaswitch"], "k0": ["--method", "adaswitch", "--k", "0"]}
SWITCH = ("switch_rate", "switch_pos", "teacher_frac")  # metrics.jsonl's switch statistics, per step


def run_argv(args, method: str, seed: int) -> list[str]:
    """The CLI's flags for one run: section 8.3's, on the training file without the held-out prompts."""
    return ["--teacher", str(args.pair / "teacher"), "--student", str(args.student), "--dataset",
            str(args.out / "pydoc-train.jsonl"), "--no-chat-template", "--score", "rouge", "--batch-size",
            str(args.batch_size), "--max-new-tokens", str(args.new_tokens), "--max-steps", str(args.steps),
            "--eval-samples", "1", "--eval-every", str(args.eval_every), "--lr", "1e-5", "--warmup-ratio", "0",
            "--save-every", str(10 * args.steps), "--log-every", "1",
            *METHODS[method], "--seed", str(seed), "--output-dir", str(args.out / f"{method}-{seed}"), "--overwrite"]


def held_out_rows(args) -> list[dict]:
    """The CLI's own held-out rows of pydoc.jsonl (tutorial 8.1's real_rows): no run trains on them."""
    return A.load_rows(A.parse_args(["--teacher", str(args.pair / "teacher"), "--student", str(args.student),
                                     "--dataset", str(args.pair / "pydoc.jsonl"), "--eval-samples", str(args.prompts)]))[1]


def one_run(args, method: str, seed: int) -> None:
    """A.main on one method and seed, in this process; held-out scores at step 0 and at each of the CLI's evaluations
    go to held_out.json beside its metrics.jsonl."""
    argv, out, scores, reference = run_argv(args, method, seed), args.out / f"{method}-{seed}", [], {}
    run_args = A.parse_args(argv)
    rows = held_out_rows(args)
    load_models, evaluate = A.load_models, A.evaluate

    def loaded(*given, **kwargs):
        """load_models, then the references from its teacher: greedy, the teacher's hidden states kept."""
        tokenizer, teacher, student = load_models(*given, **kwargs)
        pad, stop = tokenizer.pad_token_id, A.stop_ids(tokenizer, teacher, student)
        batch = A.collate(A.encode(rows, tokenizer, run_args), pad, "cpu")
        out_ = A.rollout(None, teacher, batch["prompt_ids"], batch["prompt_mask"], "teacher", do_sample=False,
                         max_new_tokens=args.new_tokens, eos_token_id=stop, pad_token_id=pad)
        texts = tokenizer.batch_decode(out_.sequences[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)
        reference.update(teacher=teacher, rollout=out_, texts=texts, stop=stop, batch=A.collate(A.encode(
            [{"prompt": row["prompt"], "response": text} for row, text in zip(rows, texts)], tokenizer, run_args),
            pad, "cpu"))
        return tokenizer, teacher, student

    def scored(model, tokenizer, batches, eval_args, score, stop, desc="eval"):
        """evaluate, and on the student (before training: desc 'eval student'; in training: 'eval') the held-out KL
        and ROUGE-L against the teacher's continuations."""
        result = evaluate(model, tokenizer, batches, eval_args, score, stop, desc)
        if desc != "eval teacher":
            with torch.no_grad():
                kl = A.sequence_loss(model, reference["teacher"], reference["rollout"]).item()  # its teacher_hidden
            rouge = evaluate(model, tokenizer, [reference["batch"]], run_args, "rouge", reference["stop"])
            scores.append({"kl": kl, "rouge": rouge})
        return result

    A.load_models, A.evaluate = loaded, scored
    A.save_checkpoint = lambda *given: None  # nothing resumes here: 3 GB of optimizer state per run left unwritten
    A.main(argv)
    every = run_args.eval_every
    steps = [0] + sorted({s for s in range(1, args.steps + 1) if s % every == 0} | {args.steps})
    (out / "held_out.json").write_text(json.dumps({"argv": argv, "reference": reference["texts"],
                                                   "scores": dict(zip(map(str, steps), scores))}, indent=1))


def launch(args, method: str, seed: int) -> str:
    """One run in a child process of one thread, unless its folder holds one made with the same flags."""
    out = args.out / f"{method}-{seed}"
    done = out / "held_out.json"
    if done.is_file() and json.loads(done.read_text())["argv"] == run_argv(args, method, seed):
        return f"{method}-{seed}: reused"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        code = subprocess.call([sys.executable, __file__, *sys.argv[1:], "--run", method, str(seed)], stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if code:
        raise SystemExit(f"error: run {method}-{seed} failed; its output is in {out / 'log.txt'}")
    shutil.rmtree(out / "student", ignore_errors=True)  # 1 GB, scored already
    return f"{method}-{seed}: done"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over the seeds (the standard deviation / sqrt(n))."""
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def switch_stats(records: list[dict], first: int, last: int) -> dict:
    """Steps first..last of metrics.jsonl: switch rate and teacher tokens as means over the steps, the switch step as
    the mean over the rows that switched (each step's mean weighted by its switch rate); None: no row switched."""
    rows = [r for r in records if first <= r["step"] <= last and "loss" in r]
    weight = sum(r["switch_rate"] for r in rows)
    return {"switch_rate": statistics.mean(r["switch_rate"] for r in rows),
            "switch_pos": sum(r["switch_rate"] * r["switch_pos"] for r in rows if r["switch_pos"] is not None)
            / weight if weight else None,
            "teacher_frac": statistics.mean(r["teacher_frac"] for r in rows)}


def summarize(args) -> dict:
    runs = {}
    for method in METHODS:
        for seed in args.seeds:
            out = args.out / f"{method}-{seed}"
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            runs[method, seed] = {"held_out": json.loads((out / "held_out.json").read_text()),
                                  "records": records, "summary": json.loads((out / "summary.json").read_text())}
    starts = {json.dumps(run["held_out"]["scores"]["0"]) for run in runs.values()}
    references = {json.dumps(run["held_out"]["reference"]) for run in runs.values()}
    assert len(references) == 1, "the runs' references differ: the teacher's greedy rollout is not deterministic here"
    steps = list(next(iter(runs.values()))["held_out"]["scores"])
    # each half, and the first 6 steps: tutorial 8.3's budget, over which its 3-layer student's statistics are logged
    halves = [(1, args.steps // 2), (args.steps // 2 + 1, args.steps), (1, min(6, args.steps))]
    result = {"steps": args.steps, "seeds": args.seeds, "student": str(args.student), "prompts": args.prompts,
              "new_tokens": args.new_tokens, "batch_size": args.batch_size, "same_start": len(starts) == 1,
              "reference_examples": json.loads(references.pop())[:2], "methods": {}}
    for method in METHODS:
        group = [runs[method, seed] for seed in args.seeds]
        entry = result["methods"][method] = {"per_seed": {}, "seconds_per_step": statistics.mean(
            run["summary"]["seconds_per_step"] for run in group)}
        for step in steps:
            for key in ("kl", "rouge"):
                values = [run["held_out"]["scores"][step][key] for run in group]
                entry["per_seed"].setdefault(f"{key}@{step}", values)
                entry[f"{key}@{step}"] = mean_se(values)
        for first, last in halves:
            stats = [switch_stats(run["records"], first, last) for run in group]
            entry[f"switch@{first}-{last}"] = {key: statistics.mean(s[key] for s in stats) if all(
                s[key] is not None for s in stats) else None for key in SWITCH}
    for method, entry in result["methods"].items():  # the difference from AdaSwitch, with its standard error
        for step in steps:
            for key in ("kl", "rouge"):
                a, b = entry["per_seed"][f"{key}@{step}"], result["methods"]["adaswitch"]["per_seed"][f"{key}@{step}"]
                entry[f"{key}@{step}-adaswitch"] = (statistics.mean(a) - statistics.mean(b), math.sqrt(
                    (statistics.variance(a) + statistics.variance(b)) / len(a)))
    return result


def table(result: dict) -> str:
    steps = sorted({int(key.split("@")[1]) for key in result["methods"]["adaswitch"]["per_seed"]})
    number = lambda pair: f"{pair[0]:.3f} ± {pair[1]:.3f}"  # noqa: E731

    def versus(method, key):
        if method == "adaswitch":
            return ""
        diff, se = result["methods"][method][key + "-adaswitch"]
        return f"{diff:+.3f} ± {se:.3f}" + (f" ({diff / se:+.1f} s.e.)" if se > 0 else "")
    lines = ["| method | step | held-out KL | − AdaSwitch | ROUGE-L | − AdaSwitch |", "| --- | --- | --- | --- | --- | --- |"]
    start = result["methods"]["adaswitch"]  # step 0: the same untrained student in every run (same_start)
    lines.append(f"| untrained | 0 | {start['kl@0'][0]:.3f} | | {start['rouge@0'][0]:.3f} | |")
    for method in METHODS:
        for step in steps[1:]:
            entry = result["methods"][method]
            lines.append(f"| {method} | {step} | {number(entry[f'kl@{step}'])} | {versus(method, f'kl@{step}')} | "
                         f"{number(entry[f'rouge@{step}'])} | {versus(method, f'rouge@{step}')} |")
    lines += ["", "| method | steps | switch rate | switch step | teacher tokens | s/step |",
              "| --- | --- | --- | --- | --- | --- |"]
    show = lambda x, form: "-" if x is None else format(x, form)  # noqa: E731
    for method in METHODS:
        entry = result["methods"][method]
        for key in [k for k in entry if k.startswith("switch@")]:
            s = entry[key]
            lines.append(f"| {method} | {key[7:]} | {show(s['switch_rate'], '.2f')} | {show(s['switch_pos'], '.1f')} | "
                         f"{show(s['teacher_frac'], '.2f')} | {entry['seconds_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", type=Path, default=Path("runs/gemma"), help="gemma_pair.py's folder (teacher/, "
                        "pydoc.jsonl)")
    parser.add_argument("--student", type=Path, default=Path("runs/ladder/drop-5"), help="the student to train")
    parser.add_argument("--out", type=Path, default=Path("/tmp/weak"), help="the runs, the JSON and the table")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out scores")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of each method")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (the CLI's test rows)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per rollout and per reference")
    parser.add_argument("--batch-size", type=int, default=4, help="rollouts per step")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # one run, in a child
    args = parser.parse_args()
    for path in (args.pair / "teacher", args.pair / "pydoc.jsonl", args.student):
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist; make it: python gemma_pair.py {args.pair}, then "
                             f"python ladder.py --pair {args.pair} --out {args.student.parent}")
    if args.run:
        torch.set_num_threads(1)
        return one_run(args, args.run[0], int(args.run[1]))
    args.out.mkdir(parents=True, exist_ok=True)
    held_out = {row["prompt"] for row in held_out_rows(args)}
    (args.out / "pydoc-train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in A.read_file(
        args.pair / "pydoc.jsonl") if row["prompt"] not in held_out))
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda job: launch(args, *job), [(m, s) for s in args.seeds for m in METHODS]):
            print(line, flush=True)
    result = summarize(args)
    (args.out / "weak_compare.json").write_text(json.dumps(result, indent=1))
    (args.out / "weak_compare.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
