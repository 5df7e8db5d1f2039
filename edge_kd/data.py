"""Named data sources → a DataBundle of train/val/test images and labels.

Sources: ``fashion_mnist`` (the default) and ``mnist`` (both built in, shipped inside the package), a path to an ``.npz`` with
``x_train, y_train, x_test, y_test``, a folder of images with one subfolder per class (optionally
``train/`` and ``test/`` subfolders), or ``tfds:<name>`` for tensorflow-datasets.

Images are kept as raw uint8 pixels (N, H, W, C); models see ``raw * input_scale + input_offset``
(by default raw / 255, so inputs lie in [0, 1]).

>>> from edge_kd import data
>>> bundle = data.load("mnist", limit_train=1000, limit_test=500)
>>> bundle.info.input_shape, bundle.info.num_classes
((28, 28, 1), 10)
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Annotated, ClassVar, Optional, Sequence

import numpy as np
from pydantic import field_validator

from edge_kd.config import Config, Field, Float, Int, Invalid, Str
from edge_kd.errors import UserError
from edge_kd.fileio import sha256_file

BUILTIN = {name: Path(__file__).parent / "_data" / f"{name}.npz" for name in ("fashion_mnist", "mnist")}
#: the class names of the built-in sets (their files are the canonical bytes, which name none)
BUILTIN_CLASSES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataConfig(Config):
    """Where the images come from and how they are split; the one statement of what each setting allows."""

    KEY: ClassVar[str] = "data"
    source: Str = "fashion_mnist"
    val_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    image_size: Optional[Annotated[list[Annotated[Int, Field(gt=0)]], Field(min_length=2, max_length=2)]] = None
    limit_train: Optional[Annotated[Int, Field(ge=1)]] = None
    limit_test: Optional[Annotated[Int, Field(ge=1)]] = None
    test_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.2

    @field_validator("image_size", mode="before")
    @classmethod
    def _listed(cls, v):
        if isinstance(v, tuple):
            return list(v)
        if v is not None and not isinstance(v, list):
            raise Invalid("", f"must be [H, W] (two positive integers), got {v!r}")
        return v


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data: shapes, classes, and the raw-pixel → input mapping."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    input_scale: float = 1.0 / 255.0
    input_offset: float = 0.0


@dataclasses.dataclass
class DataBundle:
    """Raw uint8 splits (N, H, W, C) with integer labels, and the info describing them."""

    info: DataInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    #: sha256 of what the images were read from (the file, the folder's listing, the tfds name and version)
    source_digest: str = ""

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Returns raw pixels ``x`` mapped to model inputs as float32."""
        return x.astype(np.float32) * np.float32(self.info.input_scale) + np.float32(self.info.input_offset)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(normalised float32 images, int64 labels)`` of ``split`` (train, val or test)."""
        x, y = self._split(split)
        return self.normalise(x), y

    def dataset(self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                teacher_logits: np.ndarray | None = None, drop_remainder: bool = False):
        """Returns a batched tf.data pipeline of ``(normalised images, labels)`` for ``split``.

        With ``teacher_logits`` (one row per image of the split, a teacher cache), the inputs are
        ``{"image": images, "teacher_logits": rows}``: each image travels with its teachers' logits.
        """
        from edge_kd.keras import tf

        x, y = self._split(split)
        scale, offset = np.float32(self.info.input_scale), np.float32(self.info.input_offset)
        if teacher_logits is not None and len(teacher_logits) != len(x):
            raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for the {len(x)} images of {split}")
        inputs = x if teacher_logits is None else {"image": x, "teacher_logits": teacher_logits}
        ds = tf.data.Dataset.from_tensor_slices((inputs, y))
        if shuffle:
            ds = ds.shuffle(min(len(x), 60000), seed=seed, reshuffle_each_iteration=True)

        def normalise(a, b):
            if isinstance(a, dict):
                return {**a, "image": tf.cast(a["image"], tf.float32) * scale + offset}, b
            return tf.cast(a, tf.float32) * scale + offset, b

        ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(normalise, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _split(self, split):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")


def load(source: str = "fashion_mnist", *, val_fraction: float = 0.1, seed: int = 0, limit_train: int | None = None,
         limit_test: int | None = None, image_size: Sequence[int] | None = None,
         test_fraction: float = 0.2) -> DataBundle:
    """Returns the DataBundle for ``source``; a bad source or setting is a one-line UserError.

    ``val_fraction`` of the training images (stratified, by ``seed``) are held out for validation.
    ``limit_train``/``limit_test`` keep the first N (after a seeded shuffle) for quick runs.
    ``image_size`` (H, W) resizes image-folder and tfds images; ``test_fraction`` splits an image folder
    that has no ``test/`` subfolder. The settings are checked by ``DataConfig``.
    """
    cfg = DataConfig(source=str(source), val_fraction=val_fraction, limit_train=limit_train, limit_test=limit_test,
                     image_size=image_size, test_fraction=test_fraction)
    return load_config(cfg, seed=seed)


def load_config(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Returns the DataBundle ``cfg`` describes (see ``load``)."""
    source, image_size = cfg.source, cfg.image_size
    if source in BUILTIN:
        name = source
        x_tr, y_tr, x_te, y_te, class_names = _load_npz(BUILTIN[source])
        class_names = class_names or BUILTIN_CLASSES.get(source)
        digest = sha256_file(BUILTIN[source])
    elif source.startswith("tfds:"):
        name = source[5:]
        x_tr, y_tr, x_te, y_te, class_names, version = _load_tfds(name, image_size)
        digest = hashlib.sha256(f"tfds:{name}:{version}".encode()).hexdigest()
    else:
        path = Path(source)
        name = path.stem or path.name
        if path.is_dir():
            x_tr, y_tr, x_te, y_te, class_names = _load_folder(path, image_size, cfg.test_fraction, seed)
            digest = _listing_digest(path)
        elif path.is_file() and path.suffix.lower() == ".npz":
            x_tr, y_tr, x_te, y_te, class_names = _load_npz(path)
            digest = sha256_file(path)
        elif path.exists():
            raise UserError(f"data '{source}' is neither an .npz file nor a folder of class subfolders")
        else:
            raise UserError(f"data '{source}' not found; expected one of {', '.join(BUILTIN)}, a path to an .npz "
                            "with x_train/y_train/x_test/y_test, an image folder, or tfds:<name>")
    num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    if class_names is not None and len(class_names) < num_classes:
        raise UserError(f"data '{source}': labels go up to {num_classes - 1} but it names {len(class_names)} "
                        f"classes ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}); labels must "
                        f"be 0..{len(class_names) - 1}")
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    num_classes = max(num_classes, len(class_names))
    if num_classes < 2:
        raise UserError(f"data '{source}' has fewer than 2 classes")

    rng = np.random.default_rng(seed)
    if cfg.limit_train is not None:
        keep = rng.permutation(len(x_tr))[: cfg.limit_train]
        x_tr, y_tr = x_tr[np.sort(keep)], y_tr[np.sort(keep)]
    if cfg.limit_test is not None:
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(x_te))[: cfg.limit_test])
        x_te, y_te = x_te[keep], y_te[keep]
    val_idx = _stratified_holdout(y_tr, cfg.val_fraction, rng)
    train_mask = np.ones(len(y_tr), bool)
    train_mask[val_idx] = False
    if not train_mask.any():
        raise UserError(f"data '{source}': val_fraction {cfg.val_fraction:g} leaves no training image")
    info = DataInfo(name=name, num_classes=num_classes, input_shape=tuple(int(d) for d in x_tr.shape[1:]),
                    class_names=tuple(class_names))
    return DataBundle(info, x_tr[train_mask], y_tr[train_mask], x_tr[val_idx], y_tr[val_idx], x_te, y_te,
                      source_digest=digest)


def _listing_digest(root: Path) -> str:
    """Returns a sha256 of every file's path, size and modification time under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _stratified_holdout(y, fraction, rng) -> np.ndarray:
    if fraction <= 0:
        return np.zeros(0, np.int64)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = int(round(len(idx) * fraction))
        picked.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(picked))


def _as_images(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise UserError(f"{where}: images must be N×H×W or N×H×W×C with C in 1, 3, 4; got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UserError(f"{where}: images must be numeric, got dtype {x.dtype}")
    xf = x.astype(np.float32)
    finite = np.isfinite(xf)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise UserError(f"{where}: {int((~finite).sum())} pixel value(s) are not finite (NaN or infinity), the "
                        f"first in image {int(bad[0])}; pixels must be numbers in 0..255 (or 0..1 for floats)")
    lo, hi = float(xf.min(initial=0)), float(xf.max(initial=0))
    if lo < 0 or hi > 255:
        raise UserError(f"{where}: pixel values must lie in 0..255 (or 0..1 for floats), got {lo:g}..{hi:g}")
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0:
        xf = xf * 255.0  # floats in [0, 1] are taken as pixels / 255
    return np.clip(np.rint(xf), 0, 255).astype(np.uint8)


def _as_labels(y, n, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise UserError(f"{where}: labels must be a vector of {n} integers, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or not np.all(np.mod(y, 1) == 0):
            raise UserError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype} with values such as "
                            f"{y.ravel()[:3].tolist()}")
    if len(y) and y.min() < 0:
        raise UserError(f"{where}: labels must be integers 0..K-1, got {y.min()}")
    return y.astype(np.int64)


def _load_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise UserError(f"{path.name} lacks key(s) {', '.join(missing)}; an .npz needs {', '.join(NPZ_KEYS)} "
                                f"(it has {', '.join(f.files) or 'none'})")
            arrays = {k: f[k] for k in NPZ_KEYS}
            class_names = tuple(str(c) for c in f["class_names"]) if "class_names" in f.files else None
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot read {path.name} as an .npz file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    x_tr = _as_images(arrays["x_train"], f"{path.name} x_train")
    x_te = _as_images(arrays["x_test"], f"{path.name} x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise UserError(f"{path.name}: x_train images are {x_tr.shape[1:]} but x_test images are {x_te.shape[1:]}")
    y_tr = _as_labels(arrays["y_train"], len(x_tr), f"{path.name} y_train")
    y_te = _as_labels(arrays["y_test"], len(x_te), f"{path.name} y_test")
    if len(x_tr) == 0 or len(x_te) == 0:
        raise UserError(f"{path.name}: x_train and x_test must not be empty")
    return x_tr, y_tr, x_te, y_te, class_names


def _read_class_folders(root: Path, size, where: str):
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"image folder {where} needs one subfolder per class (at least 2), found {len(classes)}")
    images, labels, modes = [], [], set()
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"image folder {where}: class '{cls}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    modes.add("L" if im.mode in ("L", "1", "I;16", "I", "F") else "RGB")
                    images.append((im.copy(), f))
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            labels.append(label)
    return classes, images, labels, modes


def _to_array(images, mode, size):
    out = []
    for im, f in images:
        im = im.convert(mode)
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), resample=3)  # bicubic
        a = np.asarray(im, dtype=np.uint8)
        out.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise UserError(f"images differ in size ({', '.join(str(s[:2]) for s in sorted(shapes)[:3])}...); "
                        "pass --image-size H,W to resize them")
    return np.stack(out)


def _load_folder(root: Path, size, test_fraction, seed):
    splits = {s: root / s for s in ("train", "test") if (root / s).is_dir()}
    if set(splits) == {"train", "test"}:
        classes, tr_images, tr_labels, tr_modes = _read_class_folders(splits["train"], size, f"{root}/train")
        te_classes, te_images, te_labels, te_modes = _read_class_folders(splits["test"], size, f"{root}/test")
        if te_classes != classes:
            raise UserError(f"image folder {root}: train/ classes {classes} differ from test/ classes {te_classes}")
        mode = "RGB" if "RGB" in tr_modes | te_modes else "L"
        x_tr, x_te = _to_array(tr_images, mode, size), _to_array(te_images, mode, size)
        if x_tr.shape[1:3] != x_te.shape[1:3]:
            raise UserError(f"image folder {root}: train/ images are {x_tr.shape[1:3]} but test/ images are "
                            f"{x_te.shape[1:3]}; pass --image-size H,W to resize them")
        return x_tr, np.array(tr_labels, np.int64), x_te, np.array(te_labels, np.int64), tuple(classes)
    classes, images, labels, modes = _read_class_folders(root, size, str(root))
    mode = "RGB" if "RGB" in modes else "L"
    x = _to_array(images, mode, size)
    y = np.array(labels, np.int64)
    test_idx = _stratified_holdout(y, test_fraction, np.random.default_rng(seed + 7))
    if len(test_idx) == 0:
        raise UserError(f"image folder {root}: too few images to hold out a test split")
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return x[mask], y[mask], x[test_idx], y[test_idx], tuple(classes)


def _load_tfds(name: str, size):
    import tensorflow_datasets as tfds

    from edge_kd.keras import tf

    try:
        # TFDS_DATA_DIR read now, not when tensorflow_datasets was first imported
        builder = tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR") or None)
    except Exception as e:  # DatasetNotFoundError and friends
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"unknown tfds dataset '{name}': {msg}") from None
    try:
        builder.download_and_prepare()
        splits = builder.info.splits
        if "train" not in splits or "test" not in splits:
            raise UserError(f"tfds dataset '{name}' needs train and test splits, it has {', '.join(splits)}")
        keys = builder.info.supervised_keys
        if not keys:
            raise UserError(f"tfds dataset '{name}' has no (image, label) supervised keys")
        out = []
        for split in ("train", "test"):
            ds = builder.as_dataset(split=split, as_supervised=True)
            if size is not None:
                ds = ds.map(lambda x, y: (tf.cast(tf.clip_by_value(tf.round(tf.image.resize(x, size)), 0, 255), tf.uint8), y))
            xs, ys = [], []
            for x, y in tfds.as_numpy(ds):
                xs.append(x)
                ys.append(y)
            if len({a.shape for a in xs}) > 1:
                raise UserError(f"tfds dataset '{name}' has images of several sizes; pass --image-size H,W")
            out += [_as_images(np.stack(xs), f"tfds:{name} {split}"), _as_labels(np.array(ys), len(ys), f"tfds:{name}")]
        label = builder.info.features[keys[1]]
        names = tuple(label.names) if hasattr(label, "names") else None
    except UserError:
        raise
    except ImportError:  # a missing dependency is a broken install, not the user's mistake: show it whole
        raise
    except Exception as e:  # no network, a failed download, a broken cache
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot get tfds dataset '{name}' (download or preparation failed): {msg}") from None
    return out[0], out[1], out[2], out[3], names, str(builder.info.version)
