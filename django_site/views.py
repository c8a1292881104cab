from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from bridge.permissions import grants_for
from bridge.session import Identity, Role


@login_required
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    identity = Identity(
        Role.OPERATOR,
        user_id=user.pk,
        username=user.get_username(),
        is_superuser=user.is_superuser,
    )
    devices = sorted(grants_for(identity).values(), key=lambda v: v.name)
    return render(request, "django_site/home.html", {"devices": devices})
