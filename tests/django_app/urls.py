from __future__ import annotations

from django.contrib.auth.views import LoginView
from django.urls import path

from . import views

urlpatterns = [
    path("accounts/login/", LoginView.as_view()),
    path("page/", views.page),
    path("apage/", views.apage),
    path("slow/", views.slow),
    path("aslow/", views.aslow),
    path("stream/", views.stream),
    path("xhtml/", views.xhtml),
    path("failing-stream/", views.failing_stream),
    path("astream/", views.astream),
    path("file/", views.file),
    path("download/", views.download),
    path("json/", views.json_view),
    path("fragment/", views.fragment),
    path("not-modified/", views.not_modified),
    path("conditional/", views.conditional),
    path("gzip/", views.gzipped),
    path("browser/", views.browser),
    path("cut-off/", views.cut_off),
    path("cut-off-stream/", views.cut_off_stream),
    path("cut-off-file/", views.cut_off_file),
    path("quiet/", views.quiet),
    path("aquiet/", views.aquiet),
    path("bye/", views.bye),
    path("abye/", views.abye),
    path("switch/", views.switch),
    path("aswitch/", views.aswitch),
]
