"""URLs a site includes to offer the bridge's HTTP API: ``path("", include("bridge.urls"))``."""

from django.urls import path

from bridge import views

app_name = "bridge"
urlpatterns = [
    path("api/token/", views.token, name="token"),
]
