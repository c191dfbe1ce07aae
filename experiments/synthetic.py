"""Synthetic stand-ins built on the spot (no download): a word-level tokenizer over a small vocabulary,
GLUE-format sentence data, and DeBERTa-v2 checkpoints of any geometry with random weights. The tests and
``scripts/gpu_check.py`` (which runs the harness on a machine with no hub) use them."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

WORDS = (
    "the a movie film plot actor story good bad great awful boring fun dull bright dark long short "
    "cat dog runs sits is was not very quite rather man woman city house"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(vocab_size: int, hidden_size: int = 32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama causal LM (4 heads, 2 key/value heads) with random weights, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def language_model_step(model, optimizer, scaler, tokens: torch.Tensor) -> float:
    """One next-token step on ``tokens`` through a GradScaler (fp16: scaled, else a plain step); the loss."""
    loss = model(input_ids=tokens, labels=tokens).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def deberta_dir(path: Path, **geometry) -> Path:
    """A DeBERTa-v2 of the given geometry (random weights, seed 0) with the word-level tokenizer, saved like a hub
    checkpoint."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    DebertaV2Model(DebertaV2Config(vocab_size=len(tokenizer), type_vocab_size=2, **geometry)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


def write_text_task(
    path: Path,
    text_keys: list[str],
    num_labels: int,
    label_names: list[str],
    splits: list[str],
    rows: int = 48,
    seed: int = 0,
) -> Path:
    """GLUE-format TSV files (``index``, text columns, ``label``) for every split."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split in splits:
        with open(path / f"{split}.tsv", "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["index", *text_keys, "label"])
            for i in range(rows):
                texts = [_sentence(rng) for _ in text_keys]
                if num_labels == 1:
                    label = f"{rng.uniform(0, 5):.3f}"
                else:
                    cls = rng.randrange(num_labels)
                    label = label_names[cls] if label_names else str(cls)
                writer.writerow([i, *texts, label])
    return path
