"""Version checks for the libraries megatron-patch builds on."""

from __future__ import annotations

from ..errors import UnsupportedVersionError

SUPPORTED_MEGATRON_CORE = "0.16"


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version() -> str:
    """Return the installed megatron-core version; raise a one-line, actionable error if unsupported.

    The CPU path and the layout facts (fused QKV order, sharded_state_dict key names) are written against
    one megatron-core minor release; another release may move them silently.
    """
    try:
        version = megatron_core_version()
    except ImportError as error:
        raise UnsupportedVersionError(
            f"megatron-core is not installed ({error}); install it with: pip install 'megatron-core~={SUPPORTED_MEGATRON_CORE}.0'"
        ) from None
    if not version.startswith(SUPPORTED_MEGATRON_CORE + "."):
        raise UnsupportedVersionError(
            f"megatron-core {version} is installed but megatron-patch supports {SUPPORTED_MEGATRON_CORE}.x; "
            f"install it with: pip install 'megatron-core~={SUPPORTED_MEGATRON_CORE}.0'"
        )
    return version
