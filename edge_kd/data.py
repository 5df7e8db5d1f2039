"""Named data sources → a DataBundle of train/val/test images and labels.

Sources: ``fashion_mnist`` (the default) and ``mnist`` (both built in, shipped inside the package), a path to an ``.npz`` with
``x_train, y_train, x_test, y_test``, a folder of images with one subfolder per class (optionally
``train/`` and ``test/`` subfolders), or ``tfds:<name>`` for tensorflow-datasets; or ``synthetic``: no training
images at all, only the classes and the input shape, the train and validation splits being images made from the
teacher (``synthetic_bundle``; a run makes them in its ``synthesize`` stage) and the test split, where the user has
one, another source's (``test``), never trained on.

Images are raw uint8 pixels (N, H, W, C); models see ``raw * input_scale + input_offset`` (by
default raw / 255, so inputs lie in [0, 1]). Built-in and ``.npz`` data are held in memory as arrays
(fast for small sets). Image folders and tfds datasets stream: the bundle keeps each split's labels
and where its images are (file paths, or positions in the tfds records), and ``dataset`` reads,
decodes and resizes them batch by batch through ``tf.data``, so a set larger than memory trains.
Code that needs pixels outside training asks for the ones it needs (``raw``, ``arrays`` with indices)
or walks a split in order (``batches``); both work the same on either kind.

>>> from edge_kd import data
>>> bundle = data.load("mnist", limit_train=1000, limit_test=500)
>>> bundle.info.input_shape, bundle.info.num_classes
((28, 28, 1), 10)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Annotated, ClassVar, Optional, Sequence, Union

import numpy as np
from pydantic import field_validator, model_validator

from edge_kd.config import Config, Field, Float, Int, Invalid, Str
from edge_kd.errors import UserError, first_line
from edge_kd.fileio import sha256_file

BUILTIN = {name: Path(__file__).parent / "_data" / f"{name}.npz" for name in ("fashion_mnist", "mnist")}
#: the source of a run without training images (``synthetic_bundle``)
SYNTHETIC = "synthetic"
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
    #: source synthetic: the classes, their count or their names (in the order of the teacher's outputs)
    classes: Optional[Union[Annotated[Int, Field(ge=2)], Annotated[list[Str], Field(min_length=2)]]] = None
    #: source synthetic: the input [H, W, C] of the models (the teacher's, or what its input adapter takes)
    input_shape: Optional[Annotated[list[Annotated[Int, Field(gt=0)]], Field(min_length=3, max_length=3)]] = None
    #: source synthetic: a labelled source (any of the above) whose test split measures the run and is never trained
    #: on; null: no test set, and the report gives the agreement with the teacher on held-out synthetic images
    test: Optional[Str] = None

    @model_validator(mode="after")
    def _synthetic(self):
        keys = ("classes", "input_shape", "test")
        if self.source != SYNTHETIC:
            given = [k for k in keys if getattr(self, k) is not None]
            if given:
                raise Invalid(given[0], f"is read only with data.source: {SYNTHETIC} (a run without training images)")
            return self
        for k in ("classes", "input_shape"):
            if getattr(self, k) is None:
                raise Invalid(k, f"must be given with data.source: {SYNTHETIC}: "
                                 + ("the number of classes, or their names" if k == "classes"
                                    else "the models' input [H, W, C]"))
        if self.input_shape[-1] not in (1, 3):
            raise Invalid("input_shape", f"must end in 1 or 3 channels, got {self.input_shape}")
        if self.image_size is not None or self.limit_train is not None:
            raise Invalid("image_size" if self.image_size is not None else "limit_train",
                          f"has no training images to act on with data.source: {SYNTHETIC} (input_shape sets the size)")
        if self.test == SYNTHETIC:
            raise Invalid("test", "must be a labelled source (a file, folder, built-in or tfds set)")
        return self

    def class_names(self) -> tuple[str, ...]:
        """Returns the names of ``classes`` (their numbers when only a count is given)."""
        c = self.classes
        return tuple(str(i) for i in range(c)) if isinstance(c, int) else tuple(c)

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
    #: (H, W) of the images as the source holds them, before ``image_size`` resizes them (the median by area when
    #: an image folder's differ; None when unknown): what rules such as BiT-HyperRule's resolution go by
    source_size: tuple[int, int] | None = None


@dataclasses.dataclass
class DataBundle:
    """The train/val/test splits with integer labels, and the info describing them.

    ``x_train``/``x_val``/``x_test`` are uint8 arrays (N, H, W, C) for in-memory sources, or an
    ``ImageFiles``/``TfdsImages`` store for streamed ones (``streamed``); ``y_*`` are always arrays.
    """

    info: DataInfo
    x_train: "np.ndarray | ImageStore"
    y_train: np.ndarray
    x_val: "np.ndarray | ImageStore"
    y_val: np.ndarray
    x_test: "np.ndarray | ImageStore"
    y_test: np.ndarray
    #: sha256 of what the images were read from (the file, the folder's listing, the tfds name and version)
    source_digest: str = ""

    @property
    def streamed(self) -> bool:
        """True when the images are read from files as they are needed, not held in memory."""
        return isinstance(self.x_train, ImageStore)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Returns raw pixels ``x`` mapped to model inputs as float32."""
        return x.astype(np.float32) * np.float32(self.info.input_scale) + np.float32(self.info.input_offset)

    def count(self, split: str) -> int:
        """Returns the number of images in ``split``."""
        return len(self._split(split)[1])

    def chunk(self, budget_bytes: int = 2**26, most: int = 2048) -> int:
        """Returns how many images of float32 model input fit in ``budget_bytes`` (1..``most``): a batch size
        for walking a split that stays within a memory budget whatever the image size."""
        per_image = 4 * int(np.prod(self.info.input_shape))
        return int(max(1, min(most, budget_bytes // per_image)))

    def labels(self, split: str) -> np.ndarray:
        """Returns the int64 labels of ``split`` (always in memory)."""
        return self._split(split)[1]

    def raw(self, split: str, indices=None) -> np.ndarray:
        """Returns the uint8 images of ``split`` at ``indices`` (in that order; default: all of them).

        On a streamed bundle only those images are read; asking for all of a large split reads it whole.
        """
        x, _ = self._split(split)
        idx = np.arange(len(x)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(x, ImageStore):
            return x.read(idx)
        return x if indices is None else x[idx]

    def arrays(self, split: str, indices=None) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(normalised float32 images, int64 labels)`` of ``split`` at ``indices`` (default: all)."""
        y = self._split(split)[1]
        return self.normalise(self.raw(split, indices)), (y if indices is None else y[np.asarray(indices, np.int64)])

    def first(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``arrays`` of the first ``n`` images of ``split`` (all of them when it has fewer)."""
        return self.arrays(split, np.arange(min(n, self.count(split))))

    def batches(self, split: str, batch_size: int = 1024):
        """Yields ``(normalised float32 images, labels)`` of ``split`` in order, ``batch_size`` at a time.

        Holds one batch at a time: the way to walk a whole split (predictions, evaluation) that may not fit.
        """
        x, y = self._split(split)
        if isinstance(x, ImageStore):
            start = 0
            for batch in x.ordered().batch(batch_size).as_numpy_iterator():
                yield self.normalise(batch), y[start:start + len(batch)]
                start += len(batch)
            return
        for start in range(0, len(x), batch_size):
            yield self.normalise(x[start:start + batch_size]), y[start:start + batch_size]

    def dataset(self, split: str, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                teacher_logits: np.ndarray | None = None, drop_remainder: bool = False, epochs: range | None = None,
                input_context=None):
        """Returns a batched tf.data pipeline of ``(normalised images, labels)`` for ``split``: one pass, or with
        ``epochs`` the passes of those epochs of a fit, one after another.

        One pass is in order, or with ``shuffle`` reshuffled each time it is iterated. ``epochs`` (a range, e.g.
        ``range(3, 10)``) always shuffles: each epoch's order is a function of the seed and the epoch's number, so
        a fit resumed at epoch 3 in a new process sees exactly the batches an uninterrupted fit would (the orders
        before it are drawn again, of the images' positions only, and skipped). With ``teacher_logits`` (one row per image of the split, a teacher cache), the inputs are
        ``{"image": images, "teacher_logits": rows}``: each image travels with its teachers' logits. A streamed
        split shuffles its images' addresses (every one, for files; within a buffer of
        ``TfdsImages.SHUFFLE_BUFFER`` records, for tfds) and reads and decodes them after.

        ``input_context`` (a ``tf.distribute.InputContext``: one worker of a multi-worker job, given by
        ``strategy.distribute_datasets_from_function``) makes it that worker's share of each batch of
        ``batch_size`` (the global batch, which needs ``drop_remainder``): every worker draws the same order and
        keeps the slice of its replicas (replica r takes examples ``r·b .. (r+1)·b - 1`` of each global batch, b =
        ``batch_size`` / replicas), one batch per replica in turn. Only that slice is read: a streamed split
        decodes only this worker's images (a tfds split reads every record's bytes, to shuffle them, and decodes
        its own). The replicas' batches together are the one-process batches, in the same order.
        """
        from edge_kd.keras import tf

        x, y = self._split(split)
        if teacher_logits is not None and len(teacher_logits) != len(y):
            raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for the {len(y)} images of {split}")
        labels = tf.constant(y)
        rows = None if teacher_logits is None else tf.constant(np.asarray(teacher_logits, np.float32))
        scale, offset = np.float32(self.info.input_scale), np.float32(self.info.input_offset)
        streamed = isinstance(x, ImageStore)
        if streamed:
            ds, buffer = x.addressed(), x.shuffle_buffer  # (position, address)
        else:
            ds, buffer = tf.data.Dataset.range(len(x)), min(len(x), 60000)  # positions
        if shuffle or epochs is not None:
            ds = ds.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if epochs is not None:
            if len(epochs) == 0 or epochs.step != 1 or epochs.start < 0:
                raise ValueError(f"epochs must be a non-empty range of consecutive epochs, got {epochs}")
            steps = len(y) // batch_size if drop_remainder else -(-len(y) // batch_size)
            # Each repetition draws a new order. Epoch e takes the (e+2)-th: Keras fit, given a one-pass pipeline,
            # opened it once before its first epoch and once per epoch (tf_keras' DataHandler), so epoch e of every
            # run before this option existed saw that order; keeping it keeps their figures.
            ds = ds.repeat(epochs.stop + 1).skip((epochs.start + 1) * steps)
        if input_context is not None and input_context.num_replicas_in_sync > 1:
            ds = _replicas_share(ds, batch_size, drop_remainder, input_context)

        def inputs(pos, images):
            images = tf.cast(images, tf.float32) * scale + offset
            return images if rows is None else {"image": images, "teacher_logits": tf.gather(rows, pos)}

        if streamed:
            shape = tf.TensorSpec(x.shape[1:], tf.uint8)

            def read(pos, address):
                return inputs(pos, tf.map_fn(x.decode, address, fn_output_signature=shape)), tf.gather(labels, pos)
        else:
            images = tf.constant(x)

            def read(pos):
                return inputs(pos, tf.gather(images, pos)), tf.gather(labels, pos)

        return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def content_digest(self) -> str:
        """Returns a sha256 of what the splits hold, wherever they lie: the info, the labels and the images (the pixels
        in memory; for an image folder each file's path below the folder and size; for tfds the dataset, its
        version and the records taken). Identical copies of the data in other places give the same digest."""
        h = hashlib.sha256(repr(dataclasses.astuple(self.info)).encode())
        stores = [self._split(s)[0] for s in ("train", "val", "test")]
        files = [x.paths for x in stores if isinstance(x, ImageFiles)]
        root = os.path.commonpath([p for paths in files for p in paths]) if files else ""
        for split, x in zip(("train", "val", "test"), stores):
            h.update(f"\n{split}:{len(x)}:".encode())
            h.update(np.ascontiguousarray(self._split(split)[1]).tobytes())
            if isinstance(x, ImageFiles):
                for path in x.paths:
                    h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
            elif isinstance(x, TfdsImages):
                h.update(f"{self.source_digest}:{x.split}:{x.total}:".encode())
                h.update(np.ascontiguousarray(x.positions).tobytes())
            else:
                h.update(np.ascontiguousarray(x).tobytes())
        return h.hexdigest()

    def _split(self, split):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")


def _replicas_share(ds, batch_size: int, drop_remainder: bool, input_context):
    """Returns batched ``ds`` (positions, or (position, address) pairs) cut to the slices of each global batch that
    ``input_context``'s worker feeds to its replicas: one batch per replica, in the order of the replicas' ids."""
    from edge_kd.keras import tf

    if not drop_remainder:
        raise ValueError("a global batch shared by replicas needs drop_remainder=True: a short last batch would leave "
                         "some replica fewer examples than the others, or none")
    per = input_context.get_per_replica_batch_size(batch_size)  # a ValueError unless the replicas divide it
    local = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    start = input_context.input_pipeline_id * local * per

    def cut(*batch):
        part = tf.nest.map_structure(lambda t: t[start:start + local * per], batch)
        return part if len(part) > 1 else part[0]

    ds = ds.map(cut)
    return ds if local == 1 else ds.unbatch().batch(per, drop_remainder=True)


class ImageStore:
    """The images of one split, read from where they lie when asked: a sequence of addresses.

    Subclasses say what an address is (``_addressed``, a tf.data of ``(position, address)`` in order)
    and how one becomes a uint8 image (``decode``); indexing with an index array or a boolean mask
    gives the store of those images (as NumPy indexing does, so the loader splits stores and arrays
    alike). ``shape`` is ``(N, H, W, C)`` as an array's.
    """

    shuffle_buffer: int
    #: the most the autotuned buffers of a pipeline reading this store may hold (tf.data's default: half the RAM)
    RAM_BUDGET = 2**28

    def __init__(self, n: int, image_shape: tuple[int, int, int], size):
        self.shape = (n, *image_shape)
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def __len__(self):
        return self.shape[0]

    @staticmethod
    def _index(idx):
        if np.ndim(idx) == 0:
            raise TypeError("an image store is indexed by an index array or a boolean mask; DataBundle.raw gives pixels")
        return idx

    def addressed(self):
        """Returns the tf.data of ``(position, address)`` in order; every pipeline built on it keeps to RAM_BUDGET."""
        from edge_kd.keras import tf

        options = tf.data.Options()
        options.autotune.ram_budget = self.RAM_BUDGET
        return self._addressed().with_options(options)

    def _addressed(self):
        raise NotImplementedError

    def undecodable(self) -> str | None:
        """Returns the address of the first image that does not decode, where it can be named; else None."""
        return None

    def decode(self, address):
        raise NotImplementedError

    def ordered(self):
        """Returns a tf.data of the uint8 images in order, decoded in parallel."""
        from edge_kd.keras import tf

        return self.addressed().map(lambda pos, address: self.decode(address), num_parallel_calls=tf.data.AUTOTUNE)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Returns the uint8 images at ``indices`` (positions in this store), in that order."""
        from edge_kd.keras import tf

        if len(indices) == 0:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        if len(indices) == len(self) and np.array_equal(indices, np.arange(len(self))):  # all, in order
            return np.concatenate(list(self.ordered().batch(256).as_numpy_iterator()))
        wanted = np.zeros(len(self), bool)
        wanted[indices] = True
        mask = tf.constant(wanted)
        ds = self.addressed().filter(lambda pos, address: tf.gather(mask, pos))
        ds = ds.map(lambda pos, address: (pos, self.decode(address)), num_parallel_calls=tf.data.AUTOTUNE)
        got = {}
        for pos, images in ds.batch(256).as_numpy_iterator():
            got.update(zip(pos.tolist(), images))
        return np.stack([got[int(i)] for i in indices])

    def _finish(self, image):
        """Resizes a decoded image (H, W, C) to ``size`` (``resize_uint8``) and fixes its shape."""
        from edge_kd.keras import tf

        image.set_shape([None, None, self.shape[-1]])
        if self.size is not None:
            image = resize_uint8(image, self.size)
        return tf.ensure_shape(image, self.shape[1:])


class ImageFiles(ImageStore):
    """Images in files (an image folder). TensorFlow decodes PNG and JPEG files; PIL (``by_pil``, the
    file's flag from its header) every other format and CMYK JPEGs, whose channel conversions
    TensorFlow's decoders do not all make (grey BMPs and GIFs, 32-bit BMPs)."""

    def __init__(self, paths, image_shape, size, by_pil=None):
        super().__init__(len(paths), image_shape, size)
        self.paths = np.asarray(paths, dtype=object).astype(str)
        self.by_pil = np.zeros(len(self.paths), bool) if by_pil is None else np.asarray(by_pil, bool)
        self.shuffle_buffer = max(len(self.paths), 1)  # addresses are short strings: shuffle all of them

    def __getitem__(self, idx):
        idx = self._index(idx)
        return ImageFiles(self.paths[idx], self.shape[1:], self.size, self.by_pil[idx])

    def _addressed(self):
        from edge_kd.keras import tf

        return tf.data.Dataset.from_tensor_slices((np.arange(len(self.paths), dtype=np.int64),
                                                   (self.paths, self.by_pil)))

    def undecodable(self) -> str | None:
        """Returns the first file that does not decode (what a decode error in training came from), or None."""
        from edge_kd.keras import tf

        for i, path in enumerate(self.paths):
            try:
                self.decode((tf.constant(path), tf.constant(self.by_pil[i])))
            except (tf.errors.OpError, OSError, ValueError):
                return path
        return None

    def decode(self, address):
        from edge_kd.keras import tf

        path, by_pil = address
        channels = self.shape[-1]

        def pil(p):
            from PIL import Image

            with Image.open(p.decode()) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
            return a[..., None] if a.ndim == 2 else a

        image = tf.cond(by_pil, lambda: tf.numpy_function(pil, [path], tf.uint8, stateful=False),
                        lambda: tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False))
        return self._finish(image)


class TfdsImages(ImageStore):
    """Images of one split of a prepared tfds dataset, at ``positions`` (ascending) of its records."""

    #: at most this many records a streamed tfds split shuffles among (they are not randomly addressable)
    SHUFFLE_BUFFER = 10_000
    #: and at most this many bytes of them (the buffer holds encoded records)
    SHUFFLE_BYTES = 2**28

    def __init__(self, name, data_dir, split, positions, total, image_shape, size, record_bytes=0):
        super().__init__(len(positions), image_shape, size)
        self.name, self.data_dir, self.split = name, data_dir, split
        self.positions, self.total = np.asarray(positions, np.int64), int(total)
        if np.any(np.diff(self.positions) <= 0):  # records come in file order: images and labels would part
            raise ValueError("TfdsImages positions must be strictly increasing")
        self.record_bytes = int(record_bytes)
        by_bytes = self.SHUFFLE_BYTES // self.record_bytes if self.record_bytes else self.SHUFFLE_BUFFER
        self.shuffle_buffer = int(max(1, min(len(self.positions), self.SHUFFLE_BUFFER, by_bytes)))

    def __getitem__(self, idx):
        return TfdsImages(self.name, self.data_dir, self.split, self.positions[self._index(idx)], self.total,
                          self.shape[1:], self.size, self.record_bytes)

    def _addressed(self):
        from edge_kd.keras import tf

        keep = np.zeros(self.total, bool)
        keep[self.positions] = True
        mask = tf.constant(keep)
        ds = _tfds_records(self.name, self.data_dir, self.split).enumerate()
        ds = ds.filter(lambda i, record: tf.gather(mask, i)).map(lambda i, record: record[0])
        # a filter hides the length, which training needs (steps per epoch)
        return ds.apply(tf.data.experimental.assert_cardinality(len(self))).enumerate()

    def decode(self, encoded):
        from edge_kd.keras import tf

        return self._finish(tf.io.decode_image(encoded, channels=self.shape[-1], expand_animations=False))


def load(source: str = "fashion_mnist", *, val_fraction: float = 0.1, seed: int = 0, limit_train: int | None = None,
         limit_test: int | None = None, image_size: Sequence[int] | None = None,
         test_fraction: float = 0.2) -> DataBundle:
    """Returns the DataBundle for ``source``; a bad source or setting is a one-line UserError.

    ``val_fraction`` of the training images (stratified, by ``seed``) are held out for validation.
    ``limit_train``/``limit_test`` keep the first N (after a seeded shuffle) for quick runs.
    ``image_size`` (H, W) resizes the images of any source (``resize_uint8``); ``test_fraction`` splits an image folder
    that has no ``test/`` subfolder. The settings are checked by ``DataConfig``.
    """
    cfg = DataConfig(source=str(source), val_fraction=val_fraction, limit_train=limit_train, limit_test=limit_test,
                     image_size=image_size, test_fraction=test_fraction)
    return load_config(cfg, seed=seed)


def load_config(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Returns the DataBundle ``cfg`` describes (see ``load``); for ``synthetic``, without its images yet."""
    if cfg.source == SYNTHETIC:
        return synthetic_bundle(cfg, seed=seed)
    source, image_size = cfg.source, cfg.image_size
    if source in BUILTIN:
        name = source
        x_tr, y_tr, x_te, y_te, class_names, digest = _load_npz(BUILTIN[source])
        class_names = class_names or BUILTIN_CLASSES.get(source)
        source_size = tuple(x_tr.shape[1:3])
    elif source.startswith("tfds:"):
        name = source[5:]
        x_tr, y_tr, x_te, y_te, class_names, version, source_size = _load_tfds(name, image_size)
        digest = hashlib.sha256(f"tfds:{name}:{version}".encode()).hexdigest()
    else:
        path = Path(source)
        name = path.stem or path.name
        if path.is_dir():
            x_tr, y_tr, x_te, y_te, class_names, source_size = _load_folder(path, image_size, cfg.test_fraction,
                                                                             seed)
            digest = _listing_digest(path)
        elif path.is_file() and path.suffix.lower() == ".npz":
            x_tr, y_tr, x_te, y_te, class_names, digest = _load_npz(path)
            source_size = tuple(x_tr.shape[1:3])
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
    if image_size is not None and isinstance(x_tr, np.ndarray) and tuple(x_tr.shape[1:3]) != tuple(image_size):
        x_tr, x_te = _resized(x_tr, image_size), _resized(x_te, image_size)
    val_idx = _stratified_holdout(y_tr, cfg.val_fraction, rng)
    train_mask = np.ones(len(y_tr), bool)
    train_mask[val_idx] = False
    if not train_mask.any():
        raise UserError(f"data '{source}': val_fraction {cfg.val_fraction:g} leaves no training image")
    info = DataInfo(name=name, num_classes=num_classes, input_shape=tuple(int(d) for d in x_tr.shape[1:]),
                    class_names=tuple(class_names),
                    source_size=None if source_size is None else (int(source_size[0]), int(source_size[1])))
    return DataBundle(info, x_tr[train_mask], y_tr[train_mask], x_tr[val_idx], y_tr[val_idx], x_te, y_te,
                      source_digest=digest)


def synthetic_bundle(cfg: DataConfig, x=None, y=None, seed: int = 0, digest: str = "") -> DataBundle:
    """Returns the DataBundle of a run without training images (``cfg.source`` synthetic): uint8 images ``x`` made
    from the teacher, of the classes ``y`` the teacher gives them, split into train and validation (``val_fraction``,
    stratified by ``seed``), so that validation accuracy is the agreement with the teacher on images trained on by no
    model; and the test split of the source ``cfg.test`` (resized to the input shape), or none. Without ``x``, the
    splits are empty: the shape and classes are all a run needs before its images are made. ``digest`` names what
    the images were read from (the synthesize stage's result).
    """
    h, w, c = cfg.input_shape
    names = cfg.class_names()
    empty = np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64)
    x_te, y_te = empty
    test_digest = ""
    if cfg.test is not None:
        try:
            real = load_config(DataConfig(source=cfg.test, val_fraction=0, limit_test=cfg.limit_test, image_size=[h, w],
                                          test_fraction=cfg.test_fraction), seed=seed)
        except UserError as e:
            raise UserError(f"data.test: {e}") from None
        if real.info.input_shape[-1] != c:
            raise UserError(f"data.test '{cfg.test}' has {real.info.input_shape[-1]}-channel images and "
                            f"data.input_shape {list(cfg.input_shape)} {c}")
        if real.info.num_classes > len(names):
            raise UserError(f"data.test '{cfg.test}' has {real.info.num_classes} classes and data.classes "
                            f"{len(names)}")
        x_te, y_te = real.raw("test"), real.labels("test")
        test_digest = real.source_digest
    if x is None:
        x, y = empty
    x, y = np.asarray(x, np.uint8), np.asarray(y, np.int64)
    val_idx = _stratified_holdout(y, cfg.val_fraction, np.random.default_rng(seed))
    train_mask = np.ones(len(y), bool)
    train_mask[val_idx] = False
    if len(y) and not (len(val_idx) and train_mask.any()):
        raise UserError(f"data.val_fraction {cfg.val_fraction:g} of the {len(y)} synthetic images leaves "
                        f"{'no validation' if not len(val_idx) else 'no training'} image (it is held out per class): "
                        "make more (stages.synthesize.images) or change data.val_fraction")
    info = DataInfo(name=SYNTHETIC, num_classes=len(names), input_shape=(h, w, c), class_names=names,
                    source_size=(h, w))
    return DataBundle(info, x[train_mask], y[train_mask], x[val_idx], y[val_idx], x_te, y_te,
                      source_digest=hashlib.sha256(f"{digest}:{test_digest}".encode()).hexdigest())


def resize_uint8(images, size):
    """Returns uint8 image(s) (H, W, C or N, H, W, C) resized to ``size`` (H, W): bicubic, antialiased, rounded
    and clipped back to uint8; how every source's images are resized (``image_size``)."""
    from edge_kd.keras import tf

    out = tf.image.resize(images, size, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _resized(x: np.ndarray, size, chunk: int = 512) -> np.ndarray:
    """Returns in-memory uint8 images ``x`` resized to ``size``, a chunk at a time."""
    out = np.empty((len(x), int(size[0]), int(size[1]), x.shape[-1]), np.uint8)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = resize_uint8(x[i:i + chunk], size).numpy()
    return out


def _listing_digest(root: Path) -> str:
    """Returns a sha256 of every file's path, size and modification time under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def held_out(count: int, fraction: float) -> int:
    """Returns how many of a class's ``count`` images the validation split holds out at ``fraction``."""
    return int(round(count * fraction))


def _stratified_holdout(y, fraction, rng) -> np.ndarray:
    if fraction <= 0:
        return np.zeros(0, np.int64)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picked.append(rng.permutation(idx)[:held_out(len(idx), fraction)])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


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
    """Returns (x_train, y_train, x_test, y_test, class names or None, sha256 of the file) of an .npz, its arrays
    read-only: the last two files read stay in memory while their size and modification time hold, so the runs
    of one process (a search's candidates, a notebook's reruns) decompress and hash them once."""
    path = Path(path).resolve()
    st = path.stat()
    return _read_npz(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _read_npz(path: Path, mtime_ns: int, size: int):
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
        raise UserError(f"cannot read {path.name} as an .npz file: {first_line(e)}") from None
    x_tr = _as_images(arrays["x_train"], f"{path.name} x_train")
    x_te = _as_images(arrays["x_test"], f"{path.name} x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise UserError(f"{path.name}: x_train images are {x_tr.shape[1:]} but x_test images are {x_te.shape[1:]}")
    y_tr = _as_labels(arrays["y_train"], len(x_tr), f"{path.name} y_train")
    y_te = _as_labels(arrays["y_test"], len(x_te), f"{path.name} y_test")
    if len(x_tr) == 0 or len(x_te) == 0:
        raise UserError(f"{path.name}: x_train and x_test must not be empty")
    for a in (x_tr, y_tr, x_te, y_te):
        a.flags.writeable = False  # shared by every later load of the file
    return x_tr, y_tr, x_te, y_te, class_names, sha256_file(path)


def _read_class_folders(root: Path, where: str):
    """Returns (classes, (paths, PIL flags), labels, sizes, modes) of the images under ``root``, from headers only."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"image folder {where} needs one subfolder per class (at least 2), found {len(classes)}")
    paths, labels, sizes, modes, by_pil = [], [], [], set(), []  # sizes: one (H, W) per image
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"image folder {where}: class '{cls}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            try:
                with Image.open(f) as im:  # reads the header: size and mode, not the pixels
                    sizes.append((im.height, im.width))
                    modes.add("L" if im.mode in ("L", "1", "I;16", "I", "F") else "RGB")
                    by_pil.append(im.format not in ("PNG", "JPEG") or im.mode == "CMYK")
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {f}: {first_line(e)}") from None
            paths.append(str(f))
            labels.append(label)
    return classes, (paths, by_pil), np.array(labels, np.int64), sizes, modes


def _image_shape(sizes, modes, size, differ: str) -> tuple[int, int, int]:
    """Returns the (H, W, C) the images become: ``size`` or their one size; RGB if any image is in colour."""
    distinct = set(sizes)
    if size is None and len(distinct) > 1:
        raise UserError(f"{differ} ({', '.join(str(s) for s in sorted(distinct)[:3])}...); pass --image-size H,W to "
                        "resize them")
    h, w = size if size is not None else next(iter(distinct))
    return int(h), int(w), 3 if "RGB" in modes else 1


def _median_size(sizes) -> tuple[int, int]:
    """Returns the (H, W) of median area over the images, whose sizes are ``sizes`` (one per image)."""
    ordered = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    return ordered[len(ordered) // 2]


def _load_folder(root: Path, size, test_fraction, seed):
    """Returns the folder's train and test images as ``ImageFiles`` stores (nothing decoded yet) and labels."""
    splits = {s: root / s for s in ("train", "test") if (root / s).is_dir()}
    if set(splits) == {"train", "test"}:
        classes, tr_files, y_tr, tr_sizes, tr_modes = _read_class_folders(splits["train"], f"{root}/train")
        te_classes, te_files, y_te, te_sizes, te_modes = _read_class_folders(splits["test"], f"{root}/test")
        if te_classes != classes:
            raise UserError(f"image folder {root}: train/ classes {classes} differ from test/ classes {te_classes}")
        _image_shape(tr_sizes, tr_modes, size, "images differ in size")
        _image_shape(te_sizes, te_modes, size, "images differ in size")
        shape = _image_shape(tr_sizes + te_sizes, tr_modes | te_modes, size,
                             f"image folder {root}: train/ and test/ images differ in size")
        return (ImageFiles(tr_files[0], shape, size, tr_files[1]), y_tr, ImageFiles(te_files[0], shape, size, te_files[1]),
                y_te, tuple(classes), _median_size(tr_sizes + te_sizes))
    classes, (paths, by_pil), y, sizes, modes = _read_class_folders(root, str(root))
    x = ImageFiles(paths, _image_shape(sizes, modes, size, "images differ in size"), size, by_pil)
    test_idx = _stratified_holdout(y, test_fraction, np.random.default_rng(seed + 7))
    if len(test_idx) == 0:
        raise UserError(f"image folder {root}: too few images to hold out a test split")
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return x[mask], y[mask], x[test_idx], y[test_idx], tuple(classes), _median_size(sizes)


def _tfds_records(name: str, data_dir, split: str):
    """Returns the tf.data of ``(encoded image, label)`` records of a prepared tfds split, in file order."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    image, label = builder.info.supervised_keys
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={image: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[image], ex[label]))


def _check_reachable(name: str, builder) -> None:
    """Raises a UserError at once when a host that tfds would download ``name`` from cannot be reached (no network),
    instead of after tfds' retries (minutes). The request goes as tfds' would (the same proxies), once, 10 s at most;
    any HTTP answer counts as reachable."""
    import urllib.parse

    import requests

    hosts = {}
    for url in (getattr(builder, "url_infos", None) or {}):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in ("http", "https"):
            hosts.setdefault(parts.netloc, url)
    for host, url in hosts.items():
        try:
            requests.head(url, timeout=10, allow_redirects=False)
        except requests.RequestException as e:
            why = type(e).__name__
            raise UserError(f"cannot download tfds dataset '{name}': {host} cannot be reached ({why}; no network?); "
                            f"prepare it on a machine with network and point TFDS_DATA_DIR at its folder") from None


def _load_tfds(name: str, size):
    """Returns a prepared tfds dataset's train and test images as ``TfdsImages`` stores and their labels.

    Downloads and prepares it first when tfds has not (its own cache). The labels are read once, the
    images left encoded in the records (``SkipDecoding``); nothing is decoded until a model needs it.
    """
    import tensorflow_datasets as tfds

    data_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now, not when tensorflow_datasets was imported
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        msg = first_line(e)
        raise UserError(f"unknown tfds dataset '{name}': {msg}") from None
    try:
        if not builder.is_prepared():
            _check_reachable(name, builder)
            tfds.disable_progress_bar()  # its bars and retries are not the user's business; say what happens instead
            print(f"  tfds: downloading and preparing '{name}' into {builder.data_dir} (once) ...", flush=True)
        builder.download_and_prepare()
        splits = builder.info.splits
        if "train" not in splits or "test" not in splits:
            raise UserError(f"tfds dataset '{name}' needs train and test splits, it has {', '.join(splits)}")
        keys = builder.info.supervised_keys
        if not keys:
            raise UserError(f"tfds dataset '{name}' has no (image, label) supervised keys")
        feature = builder.info.features[keys[0]]
        h, w, c = (tuple(feature.shape) + (None,) * 3)[:3]
        if c not in (1, 3, 4):
            raise UserError(f"tfds dataset '{name}': images have {c} channels; edge-kd takes 1, 3 or 4 (alpha dropped)")
        if size is None and (h is None or w is None):
            raise UserError(f"tfds dataset '{name}' has images of several sizes; pass --image-size H,W")
        shape = (*(size if size is not None else (h, w)), 1 if c == 1 else 3)
        examples = sum(int(splits[k].num_examples) for k in splits)
        record_bytes = int(builder.info.dataset_size) // max(examples, 1) if builder.info.dataset_size else 0
        out = []
        for split in ("train", "test"):
            labels = np.concatenate([y for y in _tfds_records(name, data_dir, split).map(
                lambda x, y: y).batch(8192).as_numpy_iterator()] or [np.zeros(0, np.int64)])
            out += [TfdsImages(name, data_dir, split, np.arange(len(labels)), len(labels), shape, size, record_bytes),
                    _as_labels(labels, len(labels), f"tfds:{name} {split}")]
        label = builder.info.features[keys[1]]
        names = tuple(label.names) if hasattr(label, "names") else None
    except UserError:
        raise
    except ImportError:  # a missing dependency is a broken install, not the user's mistake: show it whole
        raise
    except Exception as e:  # no network, a failed download, a broken cache
        msg = first_line(e)
        raise UserError(f"cannot get tfds dataset '{name}' (download or preparation failed): {msg}") from None
    return out[0], out[1], out[2], out[3], names, str(builder.info.version), (None if h is None or w is None else (h, w))
