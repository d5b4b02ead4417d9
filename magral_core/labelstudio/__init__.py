"""Label Studio client: REST calls through `label-studio-sdk` (`client`), task images on disk (`images`)."""

from magral_core.labelstudio.client import (
    LabelStudioClient,
    LabelStudioError,
    LSAnnotation,
    LSTask,
    is_personal_access_token,
)
from magral_core.labelstudio.images import ImageCache, ImageFetchError, parse_allowed_hosts

__all__ = [
    "ImageCache",
    "ImageFetchError",
    "LSAnnotation",
    "LSTask",
    "LabelStudioClient",
    "LabelStudioError",
    "is_personal_access_token",
    "parse_allowed_hosts",
]
