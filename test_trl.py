"""Tests for adaswitch_trl.py (AdaSwitch inside TRL's DistillationTrainer), in the style of TRL's trainer tests: tiny
random Llamas saved to a temporary folder, assertions on trainer.state.log_history and the saved student. CPU only;
the two-process test runs torchrun on gloo; the last test uses the real Gemma pair of conftest.py (fixture `pair`).

    pip install "trl==1.16.*" accelerate && python -m pytest -q test_trl.py
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the TRL route needs TRL: pip install 'trl==1.16.*' accelerate")
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import DistillationConfig, DistillationTrainer, ModelConfig, ScriptArguments, TrlParser

import adaswitch as A
import adaswitch_trl as T
from adaswitch_trl import AdaSwitchConfig, AdaSwitchTrainer

N = 10                       # new tokens per completion
HERE = Path(__file__).resolve().parent
PROMPTS = ["12+34=", "hello world", "a", "the cat sat on", "99 bottles", "abc def ghi", "q", "zz top 7"]
SWITCHING = dict(k=1.5, window=3)  # greedy on the tiny pair: rows switch at different steps, mid-way (asserted)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """student/ and teacher/ (random Llamas, 32 wide 2 layers and 64 wide 3 layers, with a character tokenizer) and
    prompts.jsonl; initializer_range 0.5 makes confident, varied next-token distributions. Rotary positions, as in
    the models people distil: TRL's loss forward passes no position_ids, so a left-padded row of an absolute-position
    model (GPT-2) is scored at positions shifted by its padding, and batches padded differently train differently."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("trl-pair")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *"0123456789+= abcdefghijklmnopqrstuvwxyz"])}
    core = Tokenizer(models.WordLevel(vocab, "<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Split(Regex("."), behavior="isolated"), decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    pair = {}
    for name, seed, width, layers in (("student", 0, 32, 2), ("teacher", 1, 64, 3)):
        torch.manual_seed(seed)
        pair[name] = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5,
            bos_token_id=None, eos_token_id=1, pad_token_id=0))
    # A second stop id, as instruct models list <|im_end|> beside EOS: the 4th token of the student's greedy first
    # completion, so that rows end early, at different steps.
    batch = tokenizer(PROMPTS[:4], padding=True, padding_side="left", return_tensors="pt")
    first = A.rollout(pair["student"], None, batch["input_ids"], batch["attention_mask"], "student", max_new_tokens=N,
                      do_sample=False).sequences[0, -N:]                                              # [N]
    for name, model in pair.items():
        model.generation_config.eos_token_id = [1, first[3].item()]
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def settings(out, **overrides) -> dict:
    """Greedy, float32, rows in file order, no saving; plain SGD with a large learning rate, so one step visibly moves
    the student and equal gradients give equal weights (Adam's first step, g / |g|, would blow the float noise of
    gradients that are zero in exact arithmetic, such as the attention key bias's, up to +-lr)."""
    return dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, max_completion_length=N,
                generation_kwargs={"do_sample": False}, learning_rate=1e-2, bf16=False, gradient_checkpointing=False,
                disable_dropout=True, shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no",
                optim="sgd", seed=0) | overrides


def make(tiny, trainer=AdaSwitchTrainer, config=AdaSwitchConfig, prompts=PROMPTS, **overrides):
    args = config(**settings(tiny / "out", **overrides))
    return trainer(model=str(tiny / "student"), teacher_model=str(tiny / "teacher"), args=args,
                   train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                   processing_class=AutoTokenizer.from_pretrained(tiny / "student", padding_side="left"))


def prompt_ids(trainer, prompts=PROMPTS[:4]) -> list[list[int]]:
    return trainer.processing_class(text=prompts)["input_ids"]


def weights(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


def reference_rollout(tiny, prompts, **knobs) -> A.Rollout:
    """adaswitch.rollout on the left-padded prompts with the untrained models, greedy, as the trainer should call it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student", padding_side="left")
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    student, teacher = (AutoModelForCausalLM.from_pretrained(tiny / name) for name in ("student", "teacher"))
    return A.rollout(student, teacher, batch["input_ids"], batch["attention_mask"], "adaswitch", max_new_tokens=N,
                     do_sample=False, eos_token_id=A.stop_ids(tokenizer, student, teacher),
                     pad_token_id=tokenizer.pad_token_id, **knobs)


def stats(ro: A.Rollout) -> dict:
    """The README's switch_rate, switch_pos, teacher_frac and divergence of one rollout, from their definitions."""
    switched, written = ro.switch_step >= 0, ro.completion_mask.bool()
    return {"switch_rate": switched.float().mean().item(), "switch_pos": ro.switch_step[switched].float().mean().item(),
            "teacher_frac": ro.from_teacher[written].float().mean().item(),
            "divergence": ro.divergences[ro.measured].mean().item()}


def completions_of(ro: A.Rollout) -> list[list[int]]:
    n = ro.completion_mask.shape[1]
    return [row[-n:][keep.bool()].tolist() for row, keep in zip(ro.sequences, ro.completion_mask)]


def test_k_inf_changes_nothing_but_the_switch(tiny):
    """Greedy, k = inf: the completions equal DistillationTrainer's own (HF generate) on the same prompts, and one step
    from the same start gives the same student as DistillationTrainer's with beta 0 (forward KL)."""
    ours = make(tiny, k=math.inf)
    theirs = make(tiny, DistillationTrainer, DistillationConfig, beta=0.0)
    ids = prompt_ids(ours)
    assert len(set(map(len, ids))) > 1  # prompts of several lengths: the left padding is exercised
    completions = ours._generate_single_turn(ids, None, {})
    assert completions == theirs._generate_single_turn(ids, None, {})
    assert len(set(map(len, completions))) > 1  # some row ended at EOS before N tokens
    start = weights(ours)
    ours.train()
    theirs.train()
    assert ours.state.log_history[0]["switch_rate"] == 0.0 and ours.state.log_history[0]["teacher_frac"] == 0.0
    after, reference = weights(ours), weights(theirs)
    assert any(not torch.equal(after[name], start[name]) for name in start), "the step changed nothing"
    for name in after:
        torch.testing.assert_close(after[name], reference[name], rtol=1e-5, atol=1e-6)


def test_switching_completions_equal_the_rollout_and_the_logs_its_statistics(tiny):
    """Greedy, with a k at which rows switch mid-way: the trainer's completions are adaswitch.rollout's on the same
    left-padded prompts, and the step logs that rollout's switch_rate, switch_pos, teacher_frac and divergence."""
    trainer = make(tiny, **SWITCHING)
    ro = reference_rollout(tiny, PROMPTS[:4], **SWITCHING)
    assert ((ro.switch_step > 0) & (ro.switch_step < N - 1)).any() and len(set(ro.switch_step.tolist())) > 1
    assert trainer._generate_single_turn(prompt_ids(trainer), None, {}) == completions_of(ro)
    trainer.train()
    log, expected = trainer.state.log_history[0], stats(ro)
    for name in ("switch_rate", "switch_pos", "teacher_frac", "divergence"):
        assert log[name] == pytest.approx(expected[name], rel=1e-6), name
    assert 0 < log["switch_rate"] < 1 and math.isfinite(log["loss"])


def test_the_jsd_switch_rule_leaves_the_loss_forward_kl(tiny):
    """switch_metric 'jsd' with its own weight switch_beta changes the switch rule only: the rollout measures that JSD
    (the logged divergence), and the step's loss is the forward KL of the same rollout (TRL's beta 0), not a JSD."""
    trainer = make(tiny, switch_metric="jsd", switch_beta=0.3, **SWITCHING)
    ro = reference_rollout(tiny, PROMPTS[:4], switch_metric="jsd", switch_beta=0.3, **SWITCHING)
    fkl_rule = reference_rollout(tiny, PROMPTS[:4], **SWITCHING)
    assert (ro.switch_step >= 0).any() and stats(ro)["divergence"] != pytest.approx(stats(fkl_rule)["divergence"])
    assert trainer._generate_single_turn(prompt_ids(trainer), None, {}) == completions_of(ro)
    trainer.train()
    student, teacher = (AutoModelForCausalLM.from_pretrained(tiny / name) for name in ("student", "teacher"))
    loss = {metric: A.sequence_loss(student, teacher, ro, metric).item() for metric in ("fkl", "jsd")}
    log = trainer.state.log_history[0]
    assert log["divergence"] == pytest.approx(stats(ro)["divergence"], rel=1e-6)
    # rel 1e-5: TRL sums the same float32 token losses in another order (3e-7 apart when written)
    assert log["loss"] == pytest.approx(loss["fkl"], rel=1e-5) and loss["jsd"] != pytest.approx(loss["fkl"], rel=0.1)


@pytest.mark.parametrize("mode", A.MODES)
def test_each_rollout_mode_trains_a_step(tiny, mode):
    """Every rollout_mode trains a step with a finite loss; its switch statistics are those of the mode."""
    trainer = make(tiny, rollout_mode=mode, skd_top_k=5, **SWITCHING)
    start = weights(trainer)
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and any(not torch.equal(p, start[n]) for n, p in weights(trainer).items())
    if mode == "student":  # TRL's own generation: no rollout, no switch statistics
        assert "switch_rate" not in log
    elif mode == "teacher":
        assert (log["switch_rate"], log["teacher_frac"], log["switch_pos"]) == (1.0, 1.0, 0.0)
    else:  # skd: the greedy student's tokens outside the teacher's top 5 are replaced; adaswitch: mid-way
        assert 0 < log["teacher_frac"] < 1 and log["switch_rate"] > 0 and log["divergence"] > 0


def a_tool(x: int) -> int:
    """Doubles x.

    Args:
        x: a number.
    """
    return 2 * x


@pytest.mark.parametrize("overrides, match", [
    (dict(use_vllm=True), "use_vllm"), (dict(top_p=0.9), "top_p"), (dict(top_k=5), "top_k"),
    (dict(min_p=0.1), "min_p"), (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(cache_implementation="static"), "cache_implementation"),
    (dict(generation_kwargs={"num_beams": 2}), "generation_kwargs"),
    (dict(window=0), "window = 0"), (dict(k=-1.0), "k = -1"), (dict(min_history=9), "min_history = 9"),
    (dict(switch_metric="jsd", switch_beta=0.0), "switch_beta = 0.0: switch_metric 'jsd' needs 0 < switch_beta < 1"),
    (dict(switch_metric="jsd", switch_beta=1.0), "switch_beta = 1.0"), (dict(skd_top_k=0), "skd_top_k = 0"),
    (dict(temperature=0.0), "temperature = 0.0"),
])
def test_unsupported_settings_are_refused_in_one_line(tiny, overrides, match):
    with pytest.raises(ValueError, match=match) as error:
        AdaSwitchConfig(**settings(tiny / "out", **overrides))
    assert "\n" not in str(error.value)


def test_sampling_settings_stay_allowed_with_trls_own_generation(tiny):
    """rollout_mode 'student' is TRL's generate: top-p and the rest are honoured there, so not refused."""
    assert AdaSwitchConfig(**settings(tiny / "out", rollout_mode="student", top_p=0.9)).top_p == 0.9


def test_tools_and_a_plain_config_are_refused_in_one_line(tiny):
    with pytest.raises(ValueError, match="tools cannot be used with rollout_mode 'adaswitch'") as error:
        AdaSwitchTrainer(model=str(tiny / "student"), teacher_model=str(tiny / "teacher"),
                         args=AdaSwitchConfig(**settings(tiny / "out")), tools=[a_tool])
    assert "\n" not in str(error.value)
    with pytest.raises(TypeError, match=r"needs args=AdaSwitchConfig"):
        AdaSwitchTrainer(model=str(tiny / "student"), args=DistillationConfig(**settings(tiny / "out")))


def test_a_launch_that_accelerate_does_not_distribute_is_refused(tiny, monkeypatch):
    """torchrun on a machine without GPUs, without --use_cpu: accelerate runs every process alone, each training its
    own copy on the same batches (seen in this file's first two-process run); refused in one line instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launched as 2 processes but accelerate runs each alone") as error:
        make(tiny)
    assert "\n" not in str(error.value)


def test_cli_knobs_are_the_cli_flags():
    """Same names, defaults and help as adaswitch.py's flags (TRL's parser appends the default itself); the loss
    defaults to forward KL (TRL's beta 0)."""
    config = {f.name: f for f in T.dataclasses.fields(AdaSwitchConfig)}
    for name in ("window", "k", "switch_metric", "switch_beta", "min_history", "teacher_writes_switch_token"):
        ours, cli = config[name], T.CLI[name]
        assert ours.default == cli.default
        assert f"{ours.metadata['help']} (default: {ours.default})" == cli.metadata["help"]
    assert config["beta"].default == 0.0 and config["rollout_mode"].default == "adaswitch"


FLAGS = ["--max_steps", "2", "--max_completion_length", str(N), "--generation_kwargs", '{"do_sample": false}',
         "--k", str(SWITCHING["k"]), "--window", str(SWITCHING["window"]), "--learning_rate", "1e-2",
         "--bf16", "false", "--gradient_checkpointing", "false", "--disable_dropout", "true", "--shuffle_dataset",
         "false", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--optim", "sgd"]
DRIVER = """import json, os, runpy, sys
import torch
sys.argv = [{script!r}, *sys.argv[1:]]
trainer = runpy.run_path({script!r}, run_name="__main__")["trainer"]  # adaswitch_trl.py's own __main__, then:
rank, out = int(os.environ["RANK"]), sys.argv[sys.argv.index("--output_dir") + 1]
torch.save(trainer.accelerator.unwrap_model(trainer.model).state_dict(), f"{{out}}/rank{{rank}}.pt")
json.dump(trainer.state.log_history, open(f"{{out}}/log{{rank}}.json", "w"))
"""


def test_two_processes_equal_one_with_the_global_batch(tiny, tmp_path):
    """torchrun, 2 processes on gloo, batch 2 each, two greedy AdaSwitch steps through adaswitch_trl.py's __main__:
    both ranks end with the same student, equal to one process with batch 4 on the same data; the logged switch
    statistics cover both ranks' rows (rank 0's two rows alone give others); the saved student loads."""
    data, two, one = tiny / "prompts.jsonl", tmp_path / "two", tmp_path / "one"
    models = ["--model_name_or_path", str(tiny / "student"), "--teacher_model_name_or_path", str(tiny / "teacher"),
              "--dataset_name", str(data)]
    (tmp_path / "driver.py").write_text(DRIVER.format(script=str(HERE / "adaswitch_trl.py")))
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as free:  # a port no other run on this machine holds
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(tmp_path / "driver.py"), *models, *FLAGS, "--output_dir", str(two),
                           "--use_cpu", "true", "--per_device_train_batch_size", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(two / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    saved = AutoModelForCausalLM.from_pretrained(two).state_dict()
    assert all(torch.equal(saved[name], ranks[0][name]) for name in saved)

    parser = TrlParser((ScriptArguments, AdaSwitchConfig, ModelConfig))
    single = T.main(*parser.parse_args_and_config([*models, *FLAGS, "--output_dir", str(one),
                                                   "--per_device_train_batch_size", "4"]))
    reference = single.accelerator.unwrap_model(single.model).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny / "student").state_dict()
    assert any(not torch.equal(reference[name], start[name]) for name in start)
    for name in reference:
        torch.testing.assert_close(ranks[0][name], reference[name], rtol=1e-4, atol=1e-5)
    logs = [json.loads((two / "log0.json").read_text())[:2], single.state.log_history[:2]]
    for name in ("loss", "switch_rate", "switch_pos", "teacher_frac", "divergence", "completions/mean_length"):
        assert [r[name] for r in logs[0]] == pytest.approx([r[name] for r in logs[1]], rel=1e-4), name
    rank0_alone = stats(reference_rollout(tiny, PROMPTS[:2], **SWITCHING))
    assert logs[0][0]["teacher_frac"] != pytest.approx(rank0_alone["teacher_frac"])


def test_one_adaswitch_step_on_the_gemma_pair(pair, tmp_path):
    """The real Gemma 3 270M teacher and its pruned student: one greedy AdaSwitch step through the trainer; rows
    switch and the loss is finite."""
    rows = [json.loads(line)["prompt"] for line in (pair / "pydoc.jsonl").read_text().splitlines()[:2]]
    args = AdaSwitchConfig(**settings(tmp_path, per_device_train_batch_size=2, max_completion_length=12,
                                      learning_rate=1e-5, k=1.0, window=2))
    trainer = AdaSwitchTrainer(model=str(pair / "student"), teacher_model=str(pair / "teacher"), args=args,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in rows]))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["switch_rate"] > 0 and 0 < log["teacher_frac"] < 1 and math.isfinite(log["loss"])


def test_non_finite_logits_end_training_in_one_line(tiny, tmp_path):
    """A student whose weights hold a NaN (diverged, or overflowed in bf16): trainer.train() stops at step 1 with one
    FloatingPointError naming the step, the model and the completion step, not a traceback from torch.multinomial; and
    adaswitch_trl.py's __main__ ends in one line, exit code 1, with the command again at a lower learning rate."""
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny / "student")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = math.nan
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny / "student").save_pretrained(broken)
    args = AdaSwitchConfig(**settings(tmp_path / "out", generation_kwargs={"do_sample": True}))
    trainer = AdaSwitchTrainer(model=str(broken), teacher_model=str(tiny / "teacher"), args=args,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                               processing_class=AutoTokenizer.from_pretrained(broken, padding_side="left"))
    with pytest.raises(FloatingPointError, match=r"^step 1: the student's logits are NaN or inf at completion step 0$"):
        trainer.train()
    flags = ["--model_name_or_path", str(broken), "--teacher_model_name_or_path", str(tiny / "teacher"),
             "--dataset_name", str(tiny / "prompts.jsonl"), *FLAGS, "--output_dir", str(tmp_path / "cli")]
    done = subprocess.run([sys.executable, str(HERE / "adaswitch_trl.py"), *flags], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last.startswith("error: step 1: the student's logits are NaN or inf at completion step 0; start again "
                           "with a lower learning rate: python ") and last.endswith("--learning_rate 0.001"), last
