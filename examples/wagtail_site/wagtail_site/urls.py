from django.db import connection
from django.http import HttpResponse
from django.urls import include, path
from wagtail import urls as wagtail_urls
from wagtail.admin import urls as wagtailadmin_urls


def healthz(request):
    """For deploy tools: 200 once the app can serve its default Site's root page from its
    database. Not just any query: during a restore the tables exist, empty, before their rows
    arrive, and the site is down all that time."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM wagtailcore_site s JOIN wagtailcore_page p ON p.id = s.root_page_id"
                       " WHERE s.is_default_site")
        if cursor.fetchone() is None:
            return HttpResponse("no default Site with a root page\n", status=503, content_type="text/plain")
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("healthz", healthz),
    path("admin/", include(wagtailadmin_urls)),
    path("", include(wagtail_urls)),
]
