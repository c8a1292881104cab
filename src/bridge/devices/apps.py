from django.apps import AppConfig


class DevicesConfig(AppConfig):
    name = "bridge.devices"
    label = "bridge"
    verbose_name = "Bridge devices"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connect the handlers that tell live connections about changes.
        from django.apps import apps

        from bridge.devices import signals

        if apps.is_installed("django.contrib.admin"):
            signals.connect_admin_notices()
