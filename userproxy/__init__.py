"""userproxy: a userspace TCP/UDP load-balancing proxy for Kubernetes Services."""

from userproxy.app import UnknownServicePort, UserProxy
from userproxy.settings import ProxySettings, Settings, SettingsError

__version__ = "0.1.0"
__all__ = [
    "ProxySettings",
    "Settings",
    "SettingsError",
    "UnknownServicePort",
    "UserProxy",
    "__version__",
]
