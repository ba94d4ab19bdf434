from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class BOSHPrebindConfig(AppConfig):
    name = "bosh_middleware.django"
    label = "bosh_prebind"
    verbose_name = "BOSH prebind"

    def ready(self) -> None:
        from .checks import check_middleware, check_settings

        checks.register(check_settings)
        checks.register(check_middleware)
