"""Tests for ladder.py: the replayed rule's statistics on hand-made divergences (exact numbers), and the whole ladder
end to end on a tiny random Gemma 3 'teacher' pruned as gemma_pair.py prunes, in seconds, without the real pair.

    python -m pytest -q test_ladder.py
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

import adaswitch as A
import ladder

# Four rows of six steps; the last row wrote three tokens (EOS at step 2), the rest of it is padding, filled here
# with large values that would fire (50 > 2 x mean(1, 1, 9, 50)) if the mask did not end the row.
D = torch.tensor([[1., 1, 1, 1, 5, 1],    # a spike at step 4, after a full window of ones
                  [1., 1, 1, 1, 1, 1],    # flat: never
                  [1., 5, 1, 1, 1, 1],    # a spike at step 1, before a full window
                  [1., 1, 9, 50, 50, 50]])  # a spike at step 2, then the row has ended
MASK = torch.tensor([[1] * 6, [1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0]]).bool()


def test_replay_stats_default_warm_up():
    """L = 4, K = 2, a full window before any switch: only row 0 fires, at step 4 (5 > 2 x mean(1, 1, 1, 1)); row 2's
    spike comes before the window is full, row 3 ends before it. The teacher writes steps 4 and 5 of 21 tokens."""
    stats = ladder.replay_stats(D, MASK, k=2.0, window=4, min_history=None)
    assert stats == {"k": 2.0, "window": 4, "min_history": 4, "switch_rate": 0.25,
                     "switch_rate_se": math.sqrt(0.25 * 0.75 / 4), "switch_step": 4.0, "teacher_share": 2 / 21}


def test_replay_stats_min_history_1():
    """The same rows with --min-history 1: row 2 fires at its spike, step 1 (5 > 2 x 1), row 3 at step 2 (9 > 2 x 1),
    row 0 still at 4: 3 of 4 rows, mean step 7/3, the teacher writes 2 + 5 + 1 of 21 tokens."""
    stats = ladder.replay_stats(D, MASK, k=2.0, window=4, min_history=1)
    assert ladder.replay(D, MASK, 2.0, 4, 1).tolist() == [4, -1, 1, 2]
    assert (stats["switch_rate"], stats["switch_step"], stats["teacher_share"]) == (0.75, 7 / 3, 8 / 21)
    assert ladder.replay_stats(D, MASK, k=math.inf, window=4, min_history=1)["switch_rate"] == 0.0  # K = inf: never


def test_ratios_skip_padding_and_the_warm_up():
    """rho_i = d_i / mean of the previous L, L = 2, from step 2 on: row 0 4 / 1, 5 / 2.5; row 1 2 / 2, then padding."""
    d, mask = torch.tensor([[1., 1, 4, 5], [2., 2, 2, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    assert ladder.ratios(d, mask, 2).tolist() == [4.0, 2.0, 1.0]
    assert ladder.quartiles(torch.tensor([1., 2, 3, 4, 5])) == {"q1": 2.0, "median": 3.0, "q3": 4.0}


@pytest.fixture
def tiny_pair(tmp_path):
    """A random 6-layer Gemma 3 with the toy character tokenizer, and a pydoc.jsonl of 12 rows, as gemma_pair.py lays
    them out: teacher/ and pydoc.jsonl."""
    tokenizer = A.char_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention"] * 5 + ["full_attention"], eos_token_id=1,
                              pad_token_id=0, bos_token_id=1, initializer_range=0.5)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    rows = [{"prompt": f"{i} abc {i + 1} dd e", "response": f" fg {i * 7 % 10} h"} for i in range(12)]
    (tmp_path / "pydoc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def ladder_argv(pair, *flags):
    return ["--pair", str(pair), "--out", str(pair / "out"), "--drops", "0", "1", "2", "--prompts", "4", "--seeds", "0",
            "1", "--max-new-tokens", "5", "--batch-size", "2", "--figure", str(pair / "ladder.png"), *flags]


def test_ladder_end_to_end(tiny_pair, capsys):
    """Two pruned students and the teacher: the students have 5 and 4 layers; the teacher's own rung has KL 0 and
    never switches; the students differ from it; every K x L x warm-up is replayed; JSON, figure and table written."""
    out = tiny_pair / "out"
    results = ladder.main(ladder_argv(tiny_pair))
    assert json.loads((out / "ladder.json").read_text()) == results  # keys are strings in memory too
    assert (tiny_pair / "ladder.png").stat().st_size > 0 and results["prompts"] == 4
    assert [AutoModelForCausalLM.from_pretrained(out / f"drop-{n}").config.num_hidden_layers for n in (1, 2)] == [5, 4]
    rungs = results["rungs"]
    assert sorted(rungs) == ["0", "1", "2"] and rungs["0"]["kl"] == 0.0
    assert all(r["switch_rate"] == 0.0 and r["per_seed"] == [0.0, 0.0] for r in rungs["0"]["replay"])
    assert rungs["1"]["kl"] > 0 and rungs["2"]["kl"] > 0 and rungs["1"]["d"]["median"] > 0
    assert len(rungs["1"]["replay"]) == len(ladder.KS) * len(ladder.WINDOWS) * len(ladder.HISTORIES)
    rows = ladder.table(results).splitlines()
    assert "drop 2: KL" in capsys.readouterr().out
    assert len(rows) == 2 + 3 and rows[2] == "| 0 (the teacher) | 0 | " + f"{rungs['0']['rouge_l']:.3f} | 0 | - | " \
        + "0.00 | " * len(ladder.KS) + "0.00 |"  # d_i = 0 everywhere: no ratio, no switch


def test_rungs_are_kept_by_their_flags(tiny_pair, monkeypatch):
    """A second call with the same flags reads every rung from out/drop-<n>.json (measure is never called); a changed
    flag (one seed instead of two) measures the rungs again, here in worker processes (--jobs 2: this process's
    patched measure is never called); --drops picks a subset of the kept rungs."""
    first = ladder.main(ladder_argv(tiny_pair))
    measured = []
    real = ladder.measure
    monkeypatch.setattr(ladder, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert ladder.main(ladder_argv(tiny_pair)) == first and measured == []
    assert ladder.main(ladder_argv(tiny_pair, "--drops", "2"))["rungs"] == {"2": first["rungs"]["2"]} and not measured
    again = ladder.main(ladder_argv(tiny_pair, "--seeds", "0", "--jobs", "2"))  # in two fresh processes
    assert not measured and json.loads((tiny_pair / "out" / "drop-1.json").read_text())["flags"]["seeds"] == [0]
    assert again["rungs"]["1"] != first["rungs"]["1"] and again["seeds"] == [0]
    assert len(again["rungs"]["1"]["replay"][0]["per_seed"]) == 1


def test_held_out_rows_come_first(tiny_pair):
    """The ladder's prompts start with adaswitch.py's held-out rows of the same file (a tenth: 1 of 12)."""
    tokenizer = A.char_tokenizer()
    tokenizer.padding_side = "left"
    batches = ladder.held_out(tiny_pair, tokenizer, 4, 5, 2)
    _, test = A.load_rows(A.Args(dataset=str(tiny_pair / "pydoc.jsonl"), eval_samples=4))
    assert batches[0]["references"][0] == test[0]["response"] and sum(len(b["references"]) for b in batches) == 4


def test_missing_pair_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="python gemma_pair.py"):
        ladder.main(["--pair", str(tmp_path / "nowhere")])
