"""Tiny local models and GLUE-format data for the harness tests, built on the spot (no download)."""

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


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)  # every tiny model
TINY_DEBERTA = dict(
    **TINY,
    max_position_embeddings=64,
    pooler_hidden_size=32,
    relative_attention=True,
    position_buckets=16,
    pos_att_type=["p2c", "c2p"],
)


def tiny_deberta_dir(path: Path) -> Path:
    """A 2-layer DeBERTa-v2 with its tokenizer, saved like a hub checkpoint."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    DebertaV2Model(DebertaV2Config(vocab_size=len(tokenizer), type_vocab_size=2, **TINY_DEBERTA)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **TINY)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_vit_dir(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, **TINY)).save_pretrained(path)
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


def write_image_task(path: Path, num_labels: int, splits: list[str], per_class: int = 3, size: int = 16) -> Path:
    """An image folder: ``<split>/<class>/<n>.png``."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in splits:
        for cls in range(min(num_labels, 4)):
            folder = path / split / f"class{cls:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return path
