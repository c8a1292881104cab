from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from bridge.devices.models import AuditEntry, Device, Grant, StatusRecord


class GrantInline(admin.TabularInline):
    model = Grant
    extra = 1
    autocomplete_fields = ["user", "group"]


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "kind", "enabled", "public", "history_size", "command_timeout"]
    list_filter = ["kind", "enabled", "public"]
    search_fields = ["name", "id"]
    inlines = [GrantInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Device | None = None) -> Any:
        # The id is the device's address in flows; it is chosen once.
        return ["id"] if obj is not None else []


@admin.register(Grant)
class GrantAdmin(admin.ModelAdmin):
    list_display = ["device", "user", "group", "permission"]
    list_filter = ["permission"]
    search_fields = ["device__name", "device__id", "user__username", "group__name"]
    autocomplete_fields = ["device", "user", "group"]


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["time", "username", "action", "device_id", "result", "remote_addr"]
    list_filter = ["action", "result"]
    search_fields = ["username", "device_id", "command_id"]
    date_hierarchy = "time"


@admin.register(StatusRecord)
class StatusRecordAdmin(ReadOnlyAdmin):
    list_display = ["device", "ts", "by", "command_id"]
    search_fields = ["device__id", "device__name"]
