from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

#: Web logins of the demo (their XMPP passwords are derived, see chat/xmpp.py).
DEMO_USERS = {"alice": "wonderland", "bob": "builder"}


class Command(BaseCommand):
    help = "Create (or reset) the demo users alice/wonderland and bob/builder."

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        for name, password in DEMO_USERS.items():
            user, _ = User.objects.get_or_create(username=name)
            user.set_password(password)
            user.save()
            if options["verbosity"] > 1:
                self.stdout.write(f"demo user {name} / {password}")
