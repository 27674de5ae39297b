"""DistillDatasetMapper: detectron2's DatasetMapper that also attaches the image's stored teacher features."""
from __future__ import annotations

import logging

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from cache import StoreEntryError, TeacherFeatureStore
from cache.format import STATUS_UNREADABLE
from pipeline.config import OnBadEntry
from pipeline.distiller import teacher_keys
from pipeline.losses import loss_class

logger = logging.getLogger(__name__)
ON_BAD_ENTRY: tuple[OnBadEntry, ...] = ("fail", "skip")


class _RecordingAugmentations(T.AugmentationList):
    """An AugmentationList that keeps the transforms of its last call: the mapper needs the flip decision."""

    def __call__(self, aug_input):
        self.last = super().__call__(aug_input)
        return self.last


def sampled_short_edges(resize: T.ResizeTransform, sizes, max_size: int) -> list[int]:
    """The short edges among `sizes` that ResizeShortestEdge turns the transform's input into its output.

    One, unless the long side was capped at `max_size`: then several sizes give the same input image (and the
    same teacher features), and any of them names the right view.
    """
    out = (resize.new_h, resize.new_w)
    return [s for s in sizes if T.ResizeShortestEdge.get_output_shape(resize.h, resize.w, s, max_size) == out]


class DistillDatasetMapper(DatasetMapper):
    """Reads each training image's teacher features in the DataLoader worker, with the image's own size and flip.

    The view read is the one the augmentation chose: the short edge that ResizeShortestEdge sampled (recovered from
    its ResizeTransform) and the flip; the store's recorded resized size at that short edge must equal the input's.
    A sampled short edge the store does not hold (DISTILL.CACHE.SIZES names a subset) trains without loss_kd.
    """

    @configurable
    def __init__(self, is_train: bool, *, store_path: str | None = None, storage_options: dict | None = None,
                 on_bad_entry: OnBadEntry = "fail", teacher_keys: list[str] | None = None,
                 store_sizes: tuple[int, ...] | None = None, **kwargs):
        """
        Args:
            is_train: as in DatasetMapper; from_config gives a store only to a training mapper.
            store_path: the teacher-feature store (a directory or a URL, DISTILL.CACHE.PATH); None
                reads no features, so the mapper is detectron2's DatasetMapper.
            storage_options: fsspec options of a URL store (DISTILL.CACHE.STORAGE_OPTIONS).
            on_bad_entry: an image whose entry is damaged or unwritten, or that stage one could not
                read (DISTILL.CACHE.ON_BAD_ENTRY): "fail" raises, naming the image and the store;
                "skip" returns a damaged or unwritten one without teacher features (DistillRCNN
                leaves it out of loss_kd and counts it) and drops an unreadable one (None).
            teacher_keys: the maps the method compares (e.g. "p2", "rpn_objectness/p2"); None
                reads every stored map. Keys the store lacks are left to the distiller's error.
            store_sizes: the short edges the store serves (DISTILL.CACHE.SIZES, or all of
                INPUT.MIN_SIZE_TRAIN), to tell which (size, flip) view an augmented image needs;
                None: the sizes the store's layout records.
            **kwargs: DatasetMapper's own arguments (augmentations, image_format, ...).
        """
        super().__init__(is_train, **kwargs)
        if on_bad_entry not in ON_BAD_ENTRY:
            raise ValueError(f"DISTILL.CACHE.ON_BAD_ENTRY={on_bad_entry!r}; choose one of {ON_BAD_ENTRY}")
        self.on_bad_entry = on_bad_entry
        self.augmentations = _RecordingAugmentations(self.augmentations.augs)
        # Opens lazily in each worker process (zarr's event loop thread does not survive fork), URL stores too.
        self.store = TeacherFeatureStore(store_path, storage_options) if store_path else None
        # Only the maps the method compares (None: all). Ones the store lacks are left to the distiller,
        # whose error says how to build a store that has them.
        self.teacher_keys = None if self.store is None or teacher_keys is None else \
            [k for k in teacher_keys if k in self.store.layout.stored_keys]
        # The short edges the store holds (a format 1-2 store records its one size only in the fingerprint).
        self.store_sizes = tuple(store_sizes or (self.store.layout.sizes if self.store is not None else ()))
        resizes = [a for a in self.augmentations.augs if isinstance(a, T.ResizeShortestEdge)]
        self._resize = resizes[0] if len(resizes) == 1 else None
        if self.store is not None and self._resize is not None and self._resize.is_range:
            raise ValueError("INPUT.MIN_SIZE_TRAIN_SAMPLING 'range' cannot be served from a store; use 'choice'")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train and cfg.DISTILL.ENABLE and cfg.DISTILL.SOURCE == "cache":
            ret["store_path"] = cfg.DISTILL.CACHE.PATH
            ret["on_bad_entry"] = cfg.DISTILL.CACHE.ON_BAD_ENTRY
            ret["storage_options"] = cfg.DISTILL.CACHE.STORAGE_OPTIONS
            ret["teacher_keys"] = teacher_keys(cfg.DISTILL.LEVELS, loss_class(cfg.DISTILL.DISTILL).source)
            from pipeline.teacher import rule_sizes, store_resize

            ret["store_sizes"] = rule_sizes(store_resize(cfg))
        return ret

    def __call__(self, dataset_dict):
        if self.store is not None and self.store.status(dataset_dict["image_id"]) == STATUS_UNREADABLE:
            # Stage one could not read this image, so the student cannot either: name it (fail), or
            # return None, on which detectron2's MapDataset draws another image (skip).
            if self.on_bad_entry == "fail":
                self.store.read(dataset_dict["image_id"])  # raises StoreEntryError with the recorded reason
            logger.warning("image %s left out of training: unreadable when store %s was written (ON_BAD_ENTRY skip)",
                           dataset_dict["image_id"], self.store.path)
            return None
        out = super().__call__(dataset_dict)
        if self.store is None:
            return out
        transforms = self.augmentations.last.transforms
        if any(isinstance(t, T.VFlipTransform) for t in transforms):
            raise ValueError("vertical flips are not served by the teacher-feature store; set INPUT.RANDOM_FLIP to 'horizontal' or 'none'")
        hflip = sum(isinstance(t, T.HFlipTransform) for t in transforms) % 2 == 1
        image_id = dataset_dict["image_id"]
        size = self._sampled_size(transforms)
        out["teacher_view"] = (size, "hflip" if hflip else "orig")  # the view served: (short edge, flip)
        if size not in self.store_sizes:
            out["teacher_features"] = None  # DistillRCNN drops this image's loss_kd and counts it
            out["teacher_skip_reason"] = (f"short edge {size} is not in store {self.store.path} (it holds "
                                          f"{list(self.store_sizes)}, DISTILL.CACHE.SIZES)")
            return out
        read_size = size if self.store.layout.sizes else None  # a format 1-2 store holds its one size unnamed
        try:
            # Stored codes, not floats, cross to the main process (cache/stored_map.py); the teacher source
            # decodes them on the student's device. Raises StoreEntryError for unwritten or damaged entries.
            features = self.store.read_codes(image_id, flip=hflip, keys=self.teacher_keys, size=read_size)
        except StoreEntryError as exc:
            if self.on_bad_entry == "fail":
                raise
            out["teacher_features"] = None  # DistillRCNN drops this image's loss_kd and counts it
            out["teacher_skip_reason"] = str(exc)
            return out
        recorded = tuple(int(v) for v in self.store.sizes(image_id, read_size)["resized_hw"])
        actual = tuple(out["image"].shape[-2:])
        if recorded != actual:
            raise ValueError(f"image {image_id}: the student's input at short edge {size} is {actual} but the store "
                             f"{self.store.path} holds features for a {recorded} input there; the resize differs")
        out["teacher_features"] = features
        return out

    def _sampled_size(self, transforms) -> int:
        """The short edge ResizeShortestEdge sampled for this image, from its ResizeTransform."""
        resizes = [t for t in transforms if isinstance(t, T.ResizeTransform)]
        if self._resize is None or len(resizes) != 1:
            if len(self.store_sizes) == 1:
                return self.store_sizes[0]  # one size: no choice was made
            raise ValueError("the training augmentations must hold one ResizeShortestEdge to serve a store of short "
                             f"edges {list(self.store_sizes)}; they are {self.augmentations.augs}")
        sampled = sampled_short_edges(resizes[0], self._resize.short_edge_length, self._resize.max_size)
        stored = [s for s in sampled if s in self.store_sizes]
        if not sampled:
            raise ValueError(f"the resize {resizes[0].h}x{resizes[0].w} -> {resizes[0].new_h}x{resizes[0].new_w} matches "
                             f"no short edge of INPUT.MIN_SIZE_TRAIN {tuple(self._resize.short_edge_length)}")
        return (stored or sampled)[0]
