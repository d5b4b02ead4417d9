"""Label Studio: REST calls through `label-studio-sdk` (`client`) with retries of idempotent calls (`retry`),
task image downloads (`downloads`) from the hosts `url_policy` allows, the label config (`label_config`),
result items and scores (`results`)."""

from magral_core.studio.client import (
    LabelStudioClient,
    LabelStudioError,
    LSAnnotation,
    LSTask,
    is_personal_access_token,
)
from magral_core.studio.downloads import DownloadCache, ImageFetchError
from magral_core.studio.retry import RetryPolicy
from magral_core.studio.url_policy import HostNotAllowed, HostPolicy, parse_allowed_hosts

__all__ = [
    "DownloadCache",
    "HostNotAllowed",
    "HostPolicy",
    "ImageFetchError",
    "LSAnnotation",
    "LSTask",
    "LabelStudioClient",
    "LabelStudioError",
    "RetryPolicy",
    "is_personal_access_token",
    "parse_allowed_hosts",
]
