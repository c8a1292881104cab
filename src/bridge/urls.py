"""URLs a site includes to offer the bridge's HTTP API: ``path("", include("bridge.urls"))``."""

from django.urls import path

from bridge import video_views, views

app_name = "bridge"
urlpatterns = [
    path("api/token/", views.token, name="token"),
    path(
        "api/devices/<str:device_id>/video-token/",
        video_views.video_token,
        name="video-token",
    ),
]
