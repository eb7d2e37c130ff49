"""Training data: image + caption discovery, buckets, samples, batches and caches."""

from .buckets import Bucket, make_buckets, nearest_bucket, pick_sub_buckets, resize_and_crop
from .cache import LatentCache, TextEmbeddingCache, latent_key
from .captions import caption_for, tag_frequency
from .dataset import BucketBatcher, Sample, build_samples
from .errors import DataError
from .images import IMAGE_EXTENSIONS, LoadedImage, find_images, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Bucket",
    "BucketBatcher",
    "DataError",
    "LatentCache",
    "LoadedImage",
    "Sample",
    "TextEmbeddingCache",
    "build_samples",
    "caption_for",
    "find_images",
    "latent_key",
    "load_image",
    "make_buckets",
    "nearest_bucket",
    "pick_sub_buckets",
    "resize_and_crop",
    "tag_frequency",
]
