"""A tensorflow-datasets builder over images it makes itself, so the real download_and_prepare path runs offline.

Defined in a module of the ``tests`` package on purpose: tfds takes a different, package-resource code
path (the one that needs ``importlib_resources``) for builders that live in a package, as the real
datasets do, than for one defined in a script.
"""
import numpy as np
import tensorflow_datasets as tfds

NAME = "edge_kd_tiny_images"
CLASSES = ["circle", "square", "triangle"]
SIZES = {"train": 60, "test": 24}


class EdgeKdTinyImages(tfds.core.GeneratorBasedBuilder):
    """12×12 grey images of three classes: each class a different constant brightness plus noise."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(12, 12, 1)),
                                                 "label": tfds.features.ClassLabel(names=CLASSES)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split="train"):
        rng = np.random.default_rng(0 if split == "train" else 1)
        for i in range(SIZES[split]):
            label = i % len(CLASSES)
            image = np.clip(60 * label + 40 + rng.normal(0, 10, (12, 12, 1)), 0, 255).astype(np.uint8)
            yield f"{split}-{i}", {"image": image, "label": label}


def expected(split: str):
    """Returns (images, labels) the builder writes for ``split``, to check what comes back."""
    rows = list(EdgeKdTinyImages._generate_examples(None, split))
    return np.stack([r["image"] for _, r in rows]), np.array([r["label"] for _, r in rows])
