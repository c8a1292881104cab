from django.db import migrations, models
from django.db.models import F


def number_existing(apps: object, schema_editor: object) -> None:
    """Rows written before ordinals existed take their id: increasing per device."""
    StatusRecord = apps.get_model("bridge", "StatusRecord")  # type: ignore[attr-defined]
    StatusRecord.objects.filter(n=0).update(n=F("id"))


class Migration(migrations.Migration):
    dependencies = [
        ("bridge", "0002_device_key"),
    ]

    operations = [
        migrations.AddField(
            model_name="statusrecord",
            name="n",
            field=models.BigIntegerField(
                default=0,
                help_text="The status's ordinal in its device's history, as replicas share it.",
            ),
        ),
        migrations.RunPython(number_existing, migrations.RunPython.noop),
    ]
