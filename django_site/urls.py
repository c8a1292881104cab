from django.contrib import admin
from django.urls import include, path

from django_site import views

urlpatterns = [
    path("", views.dashboard, name="home"),
    path("wall/", views.wall, name="wall"),
    path("flows/", views.flows, name="flows"),
    path("audit/", views.audit, name="audit"),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("", include("bridge.urls")),
]
