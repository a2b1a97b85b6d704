"""mdcloud-proxy: a local authenticating reverse proxy for OPSWAT MetaDefender Cloud."""

from __future__ import annotations

__version__ = "0.1.0"

from .app import create_app, serve
from .config import Config, load_config
from .errors import BodyError, ConfigError, ProxyError, TokenError
from .simulator import Simulator
from .tokens import ClientCredentials, Token, TokenCache

__all__ = [
    "BodyError",
    "ClientCredentials",
    "Config",
    "ConfigError",
    "ProxyError",
    "Simulator",
    "Token",
    "TokenCache",
    "TokenError",
    "__version__",
    "create_app",
    "load_config",
    "serve",
]
