from django.db import connection
from django.http import HttpResponse
from django.urls import include, path
from wagtail import urls as wagtail_urls
from wagtail.admin import urls as wagtailadmin_urls


def healthz(request):
    """For deploy tools: 200 once the app can query its database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM wagtailcore_site")
        cursor.fetchone()
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("healthz", healthz),
    path("admin/", include(wagtailadmin_urls)),
    path("", include(wagtail_urls)),
]
