"""Label Studio: REST calls through `label-studio-sdk` (`client`), task image downloads (`downloads`), the
label config (`label_config`), result items and scores (`results`)."""

from magral_core.studio.client import (
    LabelStudioClient,
    LabelStudioError,
    LSAnnotation,
    LSTask,
    is_personal_access_token,
)
from magral_core.studio.downloads import DownloadCache, ImageFetchError, parse_allowed_hosts

__all__ = [
    "DownloadCache",
    "ImageFetchError",
    "LSAnnotation",
    "LSTask",
    "LabelStudioClient",
    "LabelStudioError",
    "is_personal_access_token",
    "parse_allowed_hosts",
]
