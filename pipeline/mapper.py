"""DistillDatasetMapper: detectron2's DatasetMapper that also attaches the image's stored teacher features."""
from __future__ import annotations

from pipeline import compat  # noqa: F401  (before detectron2)
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from cache import TeacherFeatureStore


class _RecordingAugmentations(T.AugmentationList):
    """An AugmentationList that keeps the transforms of its last call: the mapper needs the flip decision."""

    def __call__(self, aug_input):
        self.last = super().__call__(aug_input)
        return self.last


class DistillDatasetMapper(DatasetMapper):
    """Reads each training image's teacher features in the DataLoader worker, with the image's own flip."""

    @configurable
    def __init__(self, is_train: bool, *, store_path: str | None = None, storage_options: dict | None = None,
                 **kwargs):
        super().__init__(is_train, **kwargs)
        self.augmentations = _RecordingAugmentations(self.augmentations.augs)
        # Opens lazily in each worker process (zarr's event loop thread does not survive fork), URL stores too.
        self.store = TeacherFeatureStore(store_path, storage_options) if store_path else None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train and cfg.DISTILL.ENABLE and cfg.DISTILL.SOURCE == "cache":
            ret["store_path"] = cfg.DISTILL.CACHE.PATH
            ret["storage_options"] = cfg.DISTILL.CACHE.STORAGE_OPTIONS
        return ret

    def __call__(self, dataset_dict):
        out = super().__call__(dataset_dict)
        if self.store is None:
            return out
        transforms = self.augmentations.last.transforms
        if any(isinstance(t, T.VFlipTransform) for t in transforms):
            raise ValueError("vertical flips are not served by the teacher-feature store; set INPUT.RANDOM_FLIP to 'horizontal' or 'none'")
        hflip = sum(isinstance(t, T.HFlipTransform) for t in transforms) % 2 == 1
        image_id = dataset_dict["image_id"]
        features = self.store.read(image_id, flip=hflip)  # raises StoreEntryError for unwritten or damaged entries
        recorded = tuple(int(v) for v in self.store.sizes(image_id)["resized_hw"])
        actual = tuple(out["image"].shape[-2:])
        if recorded != actual:
            raise ValueError(f"image {image_id}: the student's input is {actual} but the store "
                             f"{self.store.path} holds features for a {recorded} input; the resize differs")
        out["teacher_features"] = features
        return out
