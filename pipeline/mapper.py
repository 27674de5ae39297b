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


class DistillDatasetMapper(DatasetMapper):
    """Reads each training image's teacher features in the DataLoader worker, with the image's own flip."""

    @configurable
    def __init__(self, is_train: bool, *, store_path: str | None = None, storage_options: dict | None = None,
                 on_bad_entry: OnBadEntry = "fail", teacher_keys: list[str] | None = None, **kwargs):
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

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train and cfg.DISTILL.ENABLE and cfg.DISTILL.SOURCE == "cache":
            ret["store_path"] = cfg.DISTILL.CACHE.PATH
            ret["on_bad_entry"] = cfg.DISTILL.CACHE.ON_BAD_ENTRY
            ret["storage_options"] = cfg.DISTILL.CACHE.STORAGE_OPTIONS
            ret["teacher_keys"] = teacher_keys(cfg.DISTILL.LEVELS, loss_class(cfg.DISTILL.DISTILL).source)
        return ret

    def __call__(self, dataset_dict):
        if self.store is not None and self.store.sizes(dataset_dict["image_id"])["status"] == STATUS_UNREADABLE:
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
        try:
            # Stored codes, not floats, cross to the main process (cache/stored_map.py); the teacher source
            # decodes them on the student's device. Raises StoreEntryError for unwritten or damaged entries.
            features = self.store.read_codes(image_id, flip=hflip, keys=self.teacher_keys)
        except StoreEntryError as exc:
            if self.on_bad_entry == "fail":
                raise
            out["teacher_features"] = None  # DistillRCNN drops this image's loss_kd and counts it
            out["teacher_skip_reason"] = str(exc)
            return out
        recorded = tuple(int(v) for v in self.store.sizes(image_id)["resized_hw"])
        actual = tuple(out["image"].shape[-2:])
        if recorded != actual:
            raise ValueError(f"image {image_id}: the student's input is {actual} but the store "
                             f"{self.store.path} holds features for a {recorded} input; the resize differs")
        out["teacher_features"] = features
        return out
