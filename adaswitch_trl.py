"""AdaSwitch inside TRL's DistillationTrainer (TRL 1.16): the trainer's chunked loss, accelerate (DDP, DeepSpeed, FSDP),
logging and checkpoints, with completions written by adaswitch.rollout. Only the generation of completions changes.

    pip install -r requirements.txt "trl==1.16.*" accelerate
    python adaswitch_trl.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct --dataset_name prompts.jsonl --output_dir runs/trl
    accelerate launch --num_processes 8 adaswitch_trl.py ...    # the same flags, data parallel on 8 GPUs
    python -m pytest -q test_trl.py                               # the tests
"""
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from adaswitch import METRICS, MODES, Args, SwitchTracker, divergence, rollout, sequence_stats, stop_ids

CLI = {f.name: f for f in dataclasses.fields(Args)}


def cli_field(name: str):
    """The adaswitch.py flag of that name: its default and its help (TRL's parser appends the default itself)."""
    help = CLI[name].metadata["help"].removesuffix(f" (default: {CLI[name].default})")
    return field(default=CLI[name].default, metadata={"help": help})


@dataclass
class AdaSwitchConfig(DistillationConfig):
    """DistillationConfig with the switch rule's knobs, named and defaulted as adaswitch.py's flags, and the way
    completions are written. The loss stays TRL's generalized JSD over `beta`, forward KL by default as in the paper;
    the switch rule's divergence has its own JSD weight, `switch_beta`, so choosing it never changes the loss."""

    rollout_mode: Literal[MODES] = field(default="adaswitch", metadata={"help": (
        "who writes the completions: adaswitch (the student until the switch rule fires, then the teacher), student "
        "(TRL's own generation: on-policy KD, GKD), teacher (off-policy KD), skd (the student writes, the teacher "
        "replaces tokens outside its top skd_top_k)")})
    window: int = cli_field("window")
    k: float = cli_field("k")
    switch_metric: Literal[METRICS] = cli_field("switch_metric")
    switch_beta: float = cli_field("switch_beta")
    min_history: int | None = cli_field("min_history")
    teacher_writes_switch_token: bool = cli_field("teacher_writes_switch_token")
    skd_top_k: int = field(default=25, metadata={"help": "SKD: the teacher replaces tokens outside its top-k (25: "
                                                         "adaswitch.py's value on real models)"})
    beta: float = field(default=0.0, metadata={"help": (
        "loss: 0.0 = forward KL(teacher || student), the paper's and adaswitch.py's (TRL's default is 1.0, reverse "
        "KL); 0.5 = JSD. The loss's weight only: the switch rule's is switch_beta")})

    def __post_init__(self):
        super().__post_init__()
        if self.rollout_mode != "student":  # adaswitch.rollout samples with a temperature only, one turn, text only
            refused = {"use_vllm": self.use_vllm, "top_p": self.top_p != 1.0, "top_k": self.top_k not in (0, None),
                       "min_p": self.min_p is not None, "repetition_penalty": self.repetition_penalty != 1.0,
                       "cache_implementation": self.cache_implementation is not None,
                       "generation_kwargs": bool(set(self.generation_kwargs or {}) - {"do_sample"})}
            for name in (name for name, bad in refused.items() if bad):
                raise ValueError(f"{name} = {getattr(self, name)!r} cannot be honoured by rollout_mode "
                                 f"{self.rollout_mode!r} (adaswitch.rollout: temperature sampling or greedy via "
                                 f"generation_kwargs {{'do_sample': false}}); unset it or use rollout_mode 'student'")
        if self.skd_top_k < 1:
            raise ValueError(f"skd_top_k = {self.skd_top_k}: the teacher's top-k needs k >= 1")
        SwitchTracker(1, self.window, self.k, min_history=self.min_history)  # the method's own checks, as the CLI's
        divergence(torch.zeros(2), torch.zeros(2), "fkl", temperature=self.temperature)
        if self.switch_metric == "jsd" and not 0 < self.switch_beta < 1:
            raise ValueError(f"switch_beta = {self.switch_beta}: switch_metric 'jsd' needs 0 < switch_beta < 1 (0 or 1 "
                             "is a plain KL: use switch_metric 'fkl' or 'rkl')")


class AdaSwitchTrainer(DistillationTrainer):
    """DistillationTrainer whose completions come from adaswitch.rollout in `args.rollout_mode`; the switch statistics
    of every process are logged as switch_rate, switch_pos, teacher_frac and divergence (adaswitch.py's README)."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, AdaSwitchConfig):
            raise TypeError("AdaSwitchTrainer needs args=AdaSwitchConfig(...) (it holds the switch rule's knobs)")
        if config.rollout_mode != "student" and kwargs.get("tools"):
            raise ValueError(f"tools cannot be used with rollout_mode {config.rollout_mode!r} (adaswitch.rollout "
                             "writes one turn); drop tools or use rollout_mode 'student'")
        super().__init__(*args, **kwargs)
        if int(os.environ.get("WORLD_SIZE", 1)) != self.accelerator.num_processes:  # accelerate's silent fallback
            raise ValueError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate runs each alone, each "
                             "training its own copy on the same batches; without a GPU pass --use_cpu true")
        if config.rollout_mode != "student" and self._is_vlm:
            raise ValueError(f"rollout_mode {config.rollout_mode!r} takes text prompts only (adaswitch.rollout has no "
                             "images); pass a tokenizer as processing_class or use rollout_mode 'student'")

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        a = self.args
        if a.rollout_mode == "student":
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        prompts, pad_id = [torch.tensor(ids) for ids in prompt_ids], self._tokenizer.pad_token_id
        device = self.accelerator.device
        input_ids = pad(prompts, pad_id, "left", self.pad_to_multiple_of).to(device)                       # [B, P]
        attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left", self.pad_to_multiple_of).to(device)
        # Both models unwrapped as TRL unwraps its student for generate: gradient checkpointing off, ZeRO-3 gathered.
        unwrap = dict(accelerator=self.accelerator, gather_deepspeed3_params=a.ds3_gather_for_generation,
                      gradient_checkpointing_kwargs=a.gradient_checkpointing_kwargs)
        with (unwrap_model_for_generation(self.model_wrapped, **unwrap) as student,
              unwrap_model_for_generation(self.teacher_model, **unwrap) as teacher,
              self._dist.summon_full_params(self.model_wrapped, recurse=False),
              self._dist.summon_full_params(self.teacher_model, recurse=False)):
            try:
                out = rollout(student, teacher, input_ids, attention_mask, a.rollout_mode,
                              max_new_tokens=self.max_completion_length, window=a.window, k=a.k,
                              skd_top_k=a.skd_top_k, switch_metric=a.switch_metric, switch_beta=a.switch_beta,
                              temperature=self.temperature,
                              do_sample=self.generation_kwargs["do_sample"], pad_token_id=pad_id,
                              eos_token_id=sorted({*self.eos_token_ids, *stop_ids(self._tokenizer, teacher)}),
                              min_history=a.min_history, teacher_writes_switch_token=a.teacher_writes_switch_token)
            except FloatingPointError as error:  # non-finite logits: diverged weights or overflow; __main__ says more
                raise FloatingPointError(f"step {self.state.global_step + 1}: {error}") from None
        self._log_switches(out)
        completions = out.sequences[:, input_ids.shape[1]:].cpu()                                          # [B, N]
        return [row[keep].tolist() for row, keep in zip(completions, out.completion_mask.bool().cpu())]

    def _log_switches(self, out) -> None:
        """adaswitch.py's sequence_stats of this process's rows, (sum, count) per statistic, added over all processes
        by one gather; the means of the README's four are logged."""
        stats = sequence_stats([out])                                                      # statistic -> (sum, count)
        sums = torch.tensor([x for pair in stats.values() for x in pair], device=self.accelerator.device)     # [2S]
        totals = self.accelerator.gather(sums).view(-1, len(sums)).sum(0).view(-1, 2).tolist()             # [S, 2]
        mode = "train" if self.model.training else "eval"
        for name, (total, count) in zip(stats, totals):
            if name != "completion_len":  # TRL logs its own completion lengths
                # TRL's log() drops NaN: no switch (or nothing measured) in a window logs no value
                self._metrics[mode][name].append(total / count if count else float("nan"))


def main(script_args, training_args, model_args):
    """trl/scripts/distillation.py's main with AdaSwitchTrainer, and a local .jsonl/.json of prompts as a dataset."""
    from datasets import load_dataset
    from trl import get_peft_config, get_quantization_config

    if training_args.teacher_model_name_or_path is None or script_args.dataset_name is None:
        raise ValueError("set --teacher_model_name_or_path and --dataset_name (a hub dataset or a .jsonl of prompts)")
    init = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**init, **(training_args.model_init_kwargs or {})}
    training_args.teacher_model_init_kwargs = {**init, "revision": training_args.teacher_model_revision,
                                               **(training_args.teacher_model_init_kwargs or {})}
    name = script_args.dataset_name
    local = Path(name).suffix in (".jsonl", ".json") and Path(name).is_file()
    dataset = load_dataset("json", data_files=name) if local else load_dataset(name, name=script_args.dataset_config)
    trainer = AdaSwitchTrainer(model=model_args.model_name_or_path,
                               teacher_model=training_args.teacher_model_name_or_path, args=training_args,
                               train_dataset=dataset[script_args.dataset_train_split],
                               eval_dataset=dataset[script_args.dataset_test_split]
                               if training_args.eval_strategy != "no" else None,
                               quantization_config=get_quantization_config(model_args),
                               peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"model saved to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    import shlex
    import sys

    from trl import ModelConfig, ScriptArguments, TrlParser

    parsed = TrlParser((ScriptArguments, AdaSwitchConfig, ModelConfig)).parse_args_and_config()
    try:
        trainer = main(*parsed)
    except FloatingPointError as error:  # a resumed Trainer keeps its checkpoint's learning rate: start again
        lower = ["--learning_rate", f"{parsed[1].learning_rate / 10:g}"]  # argparse takes a flag's last value
        sys.exit(f"error: {error}; start again with a lower learning rate: "
                 f"{shlex.join(['python', sys.argv[0], *sys.argv[1:], *lower])}")
    trainer.end()
