"""Time per optimizer step and peak memory of one training step: TRL's DistillationTrainer (on-policy), AdaSwitchTrainer
(adaswitch_trl.py) and adaswitch.py's own loop (--method on_policy, adaswitch) on the same work. A report, not a test.

    python bench_trl.py                          # the three rows below, on CPU: about 15 minutes on one thread
    python bench_trl.py --rows tiny gpt2-131k    # without the Gemma pair (which takes 1-2 minutes to build once)
    python bench_trl.py --repeats 3              # each runner 3 times, round robin; the table shows the median
    python bench_trl.py --grad-accum 1 4 --repeats 3   # not the rows: peak memory over adaswitch.py's --grad-accum

Rows (the same prompts, B and new tokens for every runner; every prompt of a row has the same length):
  tiny        random GPT-2 pair, vocabulary 512 (student 64 wide, 2 layers; teacher 128 wide, 4), B 16, 64 new tokens
  gpt2-131k   the same pair with a 131,072-token vocabulary, B 8, 192 new tokens
  gemma       the Gemma 3 270M pair of gemma_pair.py (262,144 tokens), B 4, 24 new tokens, pydoc prompts
In the GPT-2 pairs no row can end early: the final norm pins one hidden unit at 1 and only EOS reads it, with weight
-1e4. Gemma rows may end at EOS; the table shows the mean completion length each runner trained on.
Each runner is a fresh process (`OMP_NUM_THREADS=--threads`) doing 2 optimizer steps with plain sampling at T = 1, the
forward KL loss, float32, TRL's learning rate 1e-6 (adaswitch.py's default 5e-4, made for the toys, turned the Gemma
student's step-2 divergences from 0.8 to 5.8 and its rollouts all-student), no gradient checkpointing, no evaluation or
saving inside the steps; the first step
(warm-up) and the second are timed from inside (a TrainerCallback; adaswitch.py's logged tokens_per_s), and the peak
resident memory is the child's ru_maxrss (os.wait4), model loading and Python included. Load average: `uptime`'s 1 min.
--grad-accum G1 G2 ... runs only `adaswitch.py --method adaswitch` (2 optimizer steps of G micro-batches, B 8, 32 new
tokens, the rows' other flags) on a random Gemma-3-shaped pair with Gemma 3's 262,144-token vocabulary (teacher 64
wide, student 32 wide, 2 layers each; one [B, N, V] float32 tensor is 268 MB), round robin over G, and prints the
median peak memory with its range: whether the peak stays flat over G, as micro-batches freed in turn should keep it.
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNERS = ("distillation", "adaswitch_trainer", "cli_on_policy", "cli_adaswitch")
ROWS = {"tiny": (512, 16, 64), "gpt2-131k": (131072, 8, 192), "gemma": (262144, 4, 24)}  # row -> (V, B, N)
GRAD_ACCUM = (262144, 8, 32)  # (V, B, N) of --grad-accum's runs: Gemma 3's vocabulary on the tiny Gemma-shaped pair
HERE = Path(__file__).resolve().parent


def word_tokenizer(vocab: int):
    """A word-level tokenizer covering every id: <pad> 0, <eos> 1, <unk> 2, then t3 ... t{vocab - 1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<eos>", "<unk>", *(f"t{i}" for i in range(3, vocab))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def random_prompts(folder: Path, vocab: int, batch: int, prompt_len: int) -> None:
    """prompts.jsonl: 2 steps' prompts of random tokens, and 1 row adaswitch.py holds out for its test split."""
    import torch
    rng = torch.Generator().manual_seed(0)
    rows = [" ".join(f"t{i}" for i in torch.randint(3, vocab, (prompt_len,), generator=rng).tolist())
            for _ in range(2 * batch + 1)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "response": "t3"}) + "\n" for p in rows))


def gpt2_pair(folder: Path, vocab: int, batch: int, new_tokens: int, prompt_len: int = 16) -> Path:
    """teacher/, student/ and prompts.jsonl of random tokens; a word-level tokenizer covering every id."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = word_tokenizer(vocab)
    for name, width, layers in (("student", 64, 2), ("teacher", 128, 4)):
        torch.manual_seed(len(name))
        config = GPT2Config(vocab_size=vocab, n_positions=prompt_len + new_tokens, n_embd=width, n_layer=layers,
                            n_head=width // 32, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                            tie_word_embeddings=False)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():  # EOS unreachable: hidden unit 0 is always 1, and only EOS reads it, with weight -1e4
            model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 1.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[1, 0] = -1e4
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    random_prompts(folder, vocab, batch, prompt_len)
    return folder


def tiny_gemma_pair(folder: Path, vocab: int, batch: int, prompt_len: int = 16) -> Path:
    """A random Gemma-3-shaped pair (teacher 64 wide, student 32, 2 layers each, tied embedding) and prompts.jsonl:
    the vocabulary's embeddings dominate its weights, as they do in Gemma 3 270M. EOS stays reachable (Gemma's norm has
    no bias to pin), at about 1 / vocab per token."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    tokenizer = word_tokenizer(vocab)
    for name, width in (("student", 32), ("teacher", 64)):
        torch.manual_seed(len(name))
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2,
                                  layer_types=["sliding_attention", "full_attention"], eos_token_id=1, pad_token_id=0,
                                  bos_token_id=None)
        Gemma3ForCausalLM(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    random_prompts(folder, vocab, batch, prompt_len)
    return folder


def gemma_pair(folder: Path, batch: int) -> Path:
    """The cached pair of conftest.py (runs/gemma-cache/<hash of gemma_pair.py>), and 2B + 1 pydoc prompts of one
    token length (the commonest), so that every runner's batches have the same shape."""
    from collections import Counter

    from transformers import AutoTokenizer
    import gemma_pair
    source = HERE / "gemma_pair.py"
    pair = gemma_pair.build(HERE / "runs" / "gemma-cache" / hashlib.sha256(source.read_bytes()).hexdigest()[:12])
    tokenizer = AutoTokenizer.from_pretrained(pair / "student")
    rows = [json.loads(line) for line in (pair / "pydoc.jsonl").read_text().splitlines()]
    length = {id(r): len(tokenizer(r["prompt"])["input_ids"]) for r in rows}
    common = Counter(length.values()).most_common(1)[0][0]
    kept = [r for r in rows if length[id(r)] == common][:2 * batch + 1]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    for name in ("teacher", "student"):
        (folder / name).symlink_to(pair / name)
    return folder


def command(runner: str, folder: Path, batch: int, new_tokens: int, out: Path, grad_accum: int = 1) -> list[str]:
    """The child process of a runner; its results go to out (result.json, or adaswitch.py's metrics.jsonl)."""
    paths = ["--teacher", str(folder / "teacher"), "--student", str(folder / "student")]
    if runner in ("distillation", "adaswitch_trainer"):
        return [sys.executable, __file__, "--child", runner, *paths, "--data", str(folder / "prompts.jsonl"),
                "--batch", str(batch), "--new-tokens", str(new_tokens), "--out", str(out)]
    return [sys.executable, str(HERE / "adaswitch.py"), "--method", runner.removeprefix("cli_"), *paths,
            "--dataset", str(folder / "prompts.jsonl"), "--prompt-field", "prompt", "--response-field", "response",
            "--no-chat-template", "--batch-size", str(batch), "--max-new-tokens", str(new_tokens), "--max-steps", "2",
            "--grad-accum", str(grad_accum), "--lr", "1e-6", "--log-every", "1", "--eval-samples", "1",
            "--score", "exact", "--output-dir", str(out)]


def measure(runner: str, folder: Path, batch: int, new_tokens: int, threads: int, grad_accum: int = 1) -> dict:
    """Run one runner in a fresh process; its two step times, completion length and peak RSS."""
    out, load = Path(tempfile.mkdtemp(prefix=f"bench-{runner}-")), os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(command(runner, folder, batch, new_tokens, out, grad_accum), env=env, stdout=log,
                                 stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{runner} failed: see {out.with_suffix('.log')}")
    if runner.startswith("cli_"):  # tokens_per_s = tokens of the step's micro-batches / (its time, rollouts included)
        steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] > 0]
        ran = json.loads((out / "args.json").read_text())["grad_accum"]
        assert ran == grad_accum, f"adaswitch.py ran --grad-accum {ran}, not {grad_accum}"  # the times assume it
        times = [grad_accum * batch * r["completion_len"] / r["tokens_per_s"] for r in steps]
        result = {"first_s": times[0], "step_s": times[1], "completion_len": steps[1]["completion_len"],
                  "teacher_frac": steps[1]["teacher_frac"]}
    else:
        result = json.loads((out / "result.json").read_text())
    shutil.rmtree(out)  # adaswitch.py's final checkpoint of the Gemma student alone is 3.9 GB
    out.with_suffix(".log").unlink()
    return {**result, "rss_gb": usage.ru_maxrss / 2**20, "load": load}  # ru_maxrss: KiB on Linux


def trainer_child(runner: str, a) -> None:
    """Two steps of TRL's DistillationTrainer (beta 0: forward KL) or of AdaSwitchTrainer, timed by a callback."""
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from adaswitch_trl import AdaSwitchConfig, AdaSwitchTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.times = [time.perf_counter()]

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter())

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config, trainer = (DistillationConfig, DistillationTrainer) if runner == "distillation" else \
        (AdaSwitchConfig, AdaSwitchTrainer)
    args = config(output_dir=a.out, max_steps=2, per_device_train_batch_size=a.batch,
                  max_completion_length=a.new_tokens, beta=0.0, temperature=1.0, bf16=False,
                  gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
                  eval_strategy="no", seed=0)
    clock = Clock()
    trainer = trainer(model=a.student, teacher_model=a.teacher, args=args, callbacks=[clock],
                      train_dataset=load_dataset("json", data_files=a.data)["train"])
    trainer.train()
    last = trainer.state.log_history[1]
    (Path(a.out) / "result.json").write_text(json.dumps({
        "first_s": clock.times[1] - clock.times[0], "step_s": clock.times[2] - clock.times[1],
        "completion_len": last["completions/mean_length"], "teacher_frac": last.get("teacher_frac", 0.0)}))


def grad_accum_memory(grad_accums: list[int], repeats: int, threads: int) -> None:
    """Peak RSS of adaswitch.py's AdaSwitch training at each --grad-accum, each run a fresh process, round robin."""
    vocab, batch, new_tokens = GRAD_ACCUM
    folder = tiny_gemma_pair(Path(tempfile.mkdtemp(prefix="bench-grad-accum-")), vocab, batch)
    runs = {g: [] for g in grad_accums}
    for _ in range(repeats):
        for g in grad_accums:
            runs[g].append(measure("cli_adaswitch", folder, batch, new_tokens, threads, g))
    print(f"{'grad_accum':>10} {'step 2 s':>9} {'peak GB':>8} {'range':>11} {'runs':>4} {'N':>6} {'teacher':>7} "
          f"{'load':>5}")
    for g, ms in runs.items():
        rss, median = [m["rss_gb"] for m in ms], {key: statistics.median(m[key] for m in ms) for key in ms[0]}
        print(f"{g:10} {median['step_s']:9.2f} {median['rss_gb']:8.2f} {min(rss):5.2f}-{max(rss):<5.2f} {len(rss):4} "
              f"{median['completion_len']:6.1f} {median['teacher_frac']:7.2f} {median['load']:5.2f}")
    shutil.rmtree(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--repeats", type=int, default=1, help="runs of each runner, round robin; the median is shown")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    p.add_argument("--grad-accum", type=int, nargs="+", help="instead of --rows: peak memory of adaswitch.py at each")
    p.add_argument("--child", choices=RUNNERS[:2], help=argparse.SUPPRESS)
    for name in ("--teacher", "--student", "--data", "--out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return trainer_child(a.child, a)
    if a.grad_accum:
        return grad_accum_memory(a.grad_accum, a.repeats, a.threads)
    print(f"{'row':10} {'runner':18} {'step 1 s':>9} {'step 2 s':>9} {'/ TRL':>6} {'peak GB':>8} {'/ TRL':>6} "
          f"{'N':>6} {'teacher':>7} {'load':>5}")
    for row in a.rows:
        vocab, batch, new_tokens = ROWS[row]
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{row}-"))
        folder = gemma_pair(folder, batch) if row == "gemma" else gpt2_pair(folder, vocab, batch, new_tokens)
        runs = {runner: [] for runner in RUNNERS}
        for _ in range(a.repeats):
            for runner in RUNNERS:
                runs[runner].append(measure(runner, folder, batch, new_tokens, a.threads))
        median = {r: {key: statistics.median(m[key] for m in runs[r]) for key in runs[r][0]} for r in RUNNERS}
        base = median["distillation"]
        for runner, m in median.items():
            print(f"{row:10} {runner:18} {m['first_s']:9.2f} {m['step_s']:9.2f} {m['step_s'] / base['step_s']:6.2f} "
                  f"{m['rss_gb']:8.2f} {m['rss_gb'] / base['rss_gb']:6.2f} {m['completion_len']:6.1f} "
                  f"{m['teacher_frac']:7.2f} {m['load']:5.2f}", flush=True)
        shutil.rmtree(folder)  # the GPT-2 pairs' weights; the Gemma pair is linked from its cache, which stays


if __name__ == "__main__":
    main()
