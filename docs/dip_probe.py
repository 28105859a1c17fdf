"""The toy comparison's early dip, measured: `python adaswitch.py ARGS` with every evaluation also scoring the
held-out references teacher-forced (NLL per token, per-token argmax accuracy) and saying where each greedy completion
first goes wrong; --warm N fills AdamW's moments with N steps at lr 0 on other training batches before step 1
(the parameters do not move), to tell a fresh optimizer state from the learning rate itself. Used by
docs/results.md; wraps adaswitch.py's evaluate, train and AdamW, changes nothing in it.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/dip_probe.py /tmp/dip.json --method sft --max-steps 100 \\
        --eval-every 10 --output-dir /tmp/dip --overwrite [--warm 20]
"""
import json
import sys

import torch

import adaswitch as A

out_json, argv = sys.argv[1], sys.argv[2:]
warm = int(argv.pop(argv.index("--warm") + 1)) if "--warm" in argv else 0
argv = [a for a in argv if a != "--warm"]
log, evaluate, train, model_of = [], A.evaluate, A.train, {}


def kind(i: int, digits: int = 3) -> str:
    """The kind of completion character i in 'x+y+c=ss x+y+c=ss x+y+c=ss ####aaaa' (tutorial 7.1; EOS: separator)."""
    if i < 9 * digits:
        return {0: "copied digit", 2: "copied digit", 4: "carry", 6: "sum", 7: "sum"}.get(i % 9, "separator")
    return "answer digit" if 9 * digits + 4 <= i < 10 * digits + 5 else "separator"


@torch.no_grad()
def probed(model, tokenizer, batches, args, score, stop, desc="eval"):
    accuracy = evaluate(model, tokenizer, batches, args, score, stop, desc)
    if desc == "eval teacher":
        return accuracy
    was_training, nll, right, tokens, first_error = model.training, {}, 0, 0, {}
    model.eval()
    for batch in batches:
        seq = A.make_sequences(batch, model, None, A.replace(args, method="sft"), stop, tokenizer.pad_token_id)
        n, keep = seq.completion_mask.shape[1], seq.completion_mask.bool()                          # N, [B, N]
        target = seq.sequences[:, -n:]                                                              # [B, N]
        logits = A.completion_logits(model(input_ids=seq.sequences, attention_mask=seq.attention_mask,
                                           position_ids=A.position_ids(seq.attention_mask)).logits, n)  # [B, N, V]
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, N]
        for i in range(n):  # summed per token kind: [nll, count]
            total = nll.setdefault(kind(i), [0.0, 0])
            total[0], total[1] = total[0] + token_nll[:, i][keep[:, i]].sum().item(), total[1] + keep[:, i].sum().item()
        right += ((logits.argmax(-1) == target) & keep).sum().item()
        tokens += keep.sum().item()
        out = A.rollout(model, None, batch["prompt_ids"], batch["prompt_mask"], "student", do_sample=False,
                        max_new_tokens=args.max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out.sequences[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)
        for text, reference in zip(texts, batch["references"]):
            wrong = [i for i, (a, b) in enumerate(zip(text, reference)) if a != b] + \
                    ([min(len(text), len(reference))] if len(text) != len(reference) else [])
            name = kind(wrong[0]) if wrong else "none"
            first_error[name] = first_error.get(name, 0) + 1
    model.train(was_training)
    log.append({"accuracy": accuracy, "nll": sum(a for a, _ in nll.values()) / tokens,
                "nll_by_kind": {name: a / b for name, (a, b) in nll.items()}, "token_accuracy": right / tokens,
                "first_error": first_error, "greedy": texts[:3]})
    print(json.dumps({key: value for key, value in log[-1].items() if key != "greedy"}), flush=True)
    return accuracy


class WarmAdamW(torch.optim.AdamW):
    """AdamW whose moments hold `warm` steps of gradients (at lr 0: the parameters stay where they are)."""
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        model, batches, args = model_of["student"], model_of["batches"], model_of["args"]
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = 0.0
        for _ in range(warm):
            A.sequence_loss(model, None, A.make_sequences(next(batches), model, None, args, [], 0)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            super().step()
            self.zero_grad(set_to_none=True)
        for group, lr in zip(self.param_groups, lrs):
            group["lr"] = lr


def probed_train(student, teacher, batches, args, *rest, **kwargs):
    rows = A.toy_rows(args.dataset, args.toy_digits, 0)[0]  # other batches than the run's: another shuffle seed
    model_of.update(student=student, args=args, batches=A.batch_stream(
        A.encode(rows, A.char_tokenizer(), args), args.batch_size, 0, student.device, seed=12345))
    return train(student, teacher, batches, args, *rest, **kwargs)


torch.set_num_threads(1)
A.evaluate, A.train, A.torch.optim.AdamW = probed, probed_train, WarmAdamW
A.main(argv)
with open(out_json, "w") as f:
    json.dump(log, f, indent=1)
