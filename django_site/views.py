"""Pages of the standalone site: dashboard, wall screen, flows and audit.

The dashboard and the wall are shells: their tiles come from the bridge's
WebSocket (``/ws/``), which the page opens with the Django session cookie, or
anonymously (IDENTIFY ``{}``) when anonymous access is enabled and nobody is
logged in.  Which devices appear is decided there, not here.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache

from bridge.devices.models import AuditEntry, Device
from bridge.permissions import anonymous_enabled

NODERED_PERMISSION = "bridge.use_nodered"
AUDIT_PAGE_SIZE = 100
CSV_COLUMNS = (
    "time",
    "username",
    "device_id",
    "action",
    "result",
    "command_id",
    "payload",
    "detail",
    "remote_addr",
)


def editor_url() -> str | None:
    """Where the Node-RED editor is mounted, or None when it is not.

    The bridge sets ``settings.BRIDGE_NODERED_EDITOR`` (e.g. ``"/nodered/"``)
    when it serves the editor (``twistd bridge --nodered-admin URL``).
    """
    url = getattr(settings, "BRIDGE_NODERED_EDITOR", None)
    return str(url) if url else None


def may_use_flows(user: Any) -> bool:
    return bool(user.is_authenticated and user.is_active and user.has_perm(NODERED_PERMISSION))


def _nav(request: HttpRequest, tab: str) -> dict[str, Any]:
    return {"tab": tab, "show_flows": editor_url() is not None and may_use_flows(request.user)}


def _dashboard_config(request: HttpRequest, read_only: bool) -> dict[str, Any]:
    user = request.user
    return {
        "mode": "session" if user.is_authenticated else "anonymous",
        "readOnly": read_only,
        "username": user.get_username() if user.is_authenticated else None,
        "loginUrl": reverse("login"),
    }


@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    """Live tiles of the devices this user may read (public ones when logged out)."""
    if not request.user.is_authenticated and not anonymous_enabled():
        return redirect_to_login(request.get_full_path())
    context = {**_nav(request, "devices"), "dashboard_config": _dashboard_config(request, False)}
    return render(request, "django_site/dashboard.html", context)


@never_cache
def wall(request: HttpRequest) -> HttpResponse:
    """A read-only wall screen: public devices without login, or the user's own."""
    if not request.user.is_authenticated and not anonymous_enabled():
        return redirect_to_login(request.get_full_path())
    context = {**_nav(request, "wall"), "dashboard_config": _dashboard_config(request, True)}
    return render(request, "django_site/wall.html", context)


@never_cache
def flows(request: HttpRequest) -> HttpResponse:
    """The Node-RED editor, framed, for users with ``bridge.use_nodered``."""
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    if not may_use_flows(request.user):
        return forbidden(request, "Your account may not use the Node-RED editor.")
    url = editor_url()
    if url is None:
        return render(
            request,
            "django_site/flows_disabled.html",
            _nav(request, "flows"),
            status=404,
        )
    return render(request, "django_site/flows.html", {**_nav(request, "flows"), "editor_url": url})


def forbidden(request: HttpRequest, message: str) -> HttpResponse:
    return render(request, "403.html", {**_nav(request, ""), "message": message}, status=403)


class LoginView(auth_views.LoginView):
    """Django's login, with a link to the wall screen when it is public."""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["anonymous_enabled"] = anonymous_enabled()
        return context


# -------------------------------------------------------------------- audit


def _parse_date(value: str | None) -> datetime.date | None:
    if not value:
        return None
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        return None


def _day_start(day: datetime.date) -> datetime.datetime:
    return timezone.make_aware(datetime.datetime.combine(day, datetime.time.min))


def audit_filters(params: Any) -> dict[str, Any]:
    """The filters in a query string, cleaned: user, device, from, to (dates, inclusive)."""
    return {
        "user": (params.get("user") or "").strip(),
        "device": (params.get("device") or "").strip(),
        "since": _parse_date(params.get("from")),
        "until": _parse_date(params.get("to")),
    }


def filtered_audit(filters: dict[str, Any]) -> QuerySet[AuditEntry]:
    entries = AuditEntry.objects.all()
    if filters["user"]:
        entries = entries.filter(username=filters["user"])
    if filters["device"]:
        entries = entries.filter(device_id=filters["device"])
    if filters["since"]:
        entries = entries.filter(time__gte=_day_start(filters["since"]))
    if filters["until"]:
        entries = entries.filter(time__lt=_day_start(filters["until"] + datetime.timedelta(days=1)))
    return entries.order_by("-time", "-id")


def _csv_cell(value: Any) -> str:
    """Text for a spreadsheet cell; formulas are defused (CSV injection)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


class _Echo:
    def write(self, value: str) -> str:
        return value


def _csv_rows(entries: Iterable[AuditEntry]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for e in entries:
        yield writer.writerow(
            [
                timezone.localtime(e.time).isoformat(),
                _csv_cell(e.username),
                _csv_cell(e.device_id),
                _csv_cell(e.action),
                _csv_cell(e.result),
                _csv_cell(e.command_id),
                _csv_cell(json.dumps(e.payload, ensure_ascii=False))
                if e.payload is not None
                else "",
                _csv_cell(e.detail),
                _csv_cell(e.remote_addr),
            ]
        )


@never_cache
def audit(request: HttpRequest) -> HttpResponseBase:
    """The audit log for staff: filter by user, device and dates; ``?format=csv`` exports."""
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    if not (request.user.is_active and request.user.is_staff):
        return forbidden(request, "The audit log is for staff only.")
    filters = audit_filters(request.GET)
    entries = filtered_audit(filters)
    if request.GET.get("format") == "csv":
        stamp = timezone.localtime().strftime("%Y%m%d-%H%M%S")
        response = StreamingHttpResponse(
            _csv_rows(entries.iterator(chunk_size=2000)), content_type="text/csv; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
        return response
    page = Paginator(entries, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    query.pop("format", None)
    csv_query = query.copy()
    csv_query["format"] = "csv"
    devices = Device.objects.order_by("name").values_list("id", "name")
    names = dict(devices)
    rows = [
        {
            "entry": e,
            "device_name": names.get(e.device_id, ""),
            "payload": json.dumps(e.payload, ensure_ascii=False) if e.payload is not None else "",
        }
        for e in page.object_list
    ]
    usernames = (
        AuditEntry.objects.exclude(username="")
        .order_by("username")
        .values_list("username", flat=True)
        .distinct()[:500]
    )
    context = {
        **_nav(request, "audit"),
        "filters": filters,
        "page": page,
        "rows": rows,
        "devices": devices,
        "usernames": usernames,
        "query": query.urlencode(),
        "csv_query": csv_query.urlencode(),
    }
    return render(request, "django_site/audit.html", context)
